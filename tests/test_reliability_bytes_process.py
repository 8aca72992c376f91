"""
Hostile bytes against a real server tunnel: garbage, truncated and huge
handshakes, PROXY headers from clients, a flood of connections that never
speak, and a peer that stops reading. The tunnel refuses or times out each,
never lets one reach the target, and keeps serving legitimate clients.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading

import pytest

from tests.processes import Backend, recv_all, tls_connect, wait_for
from tests.reliability import ServedTunnel, cut, rss_kib


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    made = ServedTunnel(
        tmp_path_factory.mktemp("hostile-bytes"), "--connect-timeout", "2s"
    )
    yield made
    made.stop()


def _client_hello() -> bytes:
    """
    The first flight of a real TLS client: a ClientHello record.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _send_and_see_cut(served: ServedTunnel, payload: bytes) -> bool:
    """
    Send C{payload} and read until the tunnel closes: whatever comes back
    must be nothing, or a TLS alert record (content type 21).
    """
    with socket.create_connection(("127.0.0.1", served.tunnel.port), timeout=30) as raw:
        try:
            raw.sendall(payload)
            answer = recv_all(raw)
        except ConnectionError:
            return True
        return answer == b"" or answer[:1] == b"\x15"


def _refused(served: ServedTunnel, payload: bytes, what: str) -> dict:
    """
    Send C{payload} instead of a handshake; it must be cut and counted as
    a failed handshake or a handshake timeout, reaching nothing.
    """
    before = served.metrics()
    reached = served.backend.accepted

    assert _send_and_see_cut(served, payload), f"{what} was not cut"

    def counted():
        after = served.metrics()
        refused = sum(
            after.get(f"ghosttwist.refused.{reason}", 0)
            - before.get(f"ghosttwist.refused.{reason}", 0)
            for reason in ("handshake-failed", "handshake-timeout")
        )
        return refused == 1 and after

    after = wait_for(counted, f"{what} counted as refused")
    assert served.backend.accepted == reached, f"{what} reached the target"
    assert served.echo() == b"still served"
    assert served.tunnel.process.poll() is None
    return after


def test_random_bytes_instead_of_a_client_hello(served):
    after = _refused(served, os.urandom(4096), "random bytes")

    assert after["ghosttwist.accept.error"] >= 1
    assert "refused connection from" in served.tunnel.log


def test_random_bytes_in_a_handshake_record(served):
    """
    Garbage inside a well-formed handshake record header gets past the
    record layer and is refused by the handshake parser.
    """
    body = os.urandom(2000)
    record = b"\x16\x03\x01" + struct.pack("!H", len(body)) + body

    _refused(served, record, "a garbage handshake record")


def test_truncated_client_hello_times_out(served):
    """
    Half a ClientHello, then silence: the handshake is cut at
    --connect-timeout and counted as a handshake timeout.
    """
    hello = _client_hello()
    before = served.metrics()["ghosttwist.refused.handshake-timeout"]

    after = _refused(served, hello[: len(hello) // 2], "half a ClientHello")

    assert after["ghosttwist.refused.handshake-timeout"] == before + 1


def test_huge_client_hello_is_refused_early(served):
    """
    A ClientHello that claims 16 MiB is refused once its header is read;
    the tunnel neither buffers it whole nor grows.
    """
    rss_before = rss_kib(served.pid)
    fragment = b"\x00" * 16384
    header = b"\x01\xff\xff\xff"
    records = []
    for number in range(64):
        body = (header + fragment[4:]) if number == 0 else fragment
        records.append(b"\x16\x03\x01" + struct.pack("!H", len(body)) + body)

    _refused(served, b"".join(records), "a 16 MiB ClientHello")

    assert rss_kib(served.pid) - rss_before < 16 * 1024


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 443\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
        + socket.inet_aton("203.0.113.9")
        + socket.inet_aton("127.0.0.1")
        + struct.pack("!HH", 4444, 443),
    ],
    ids=["v1", "v2"],
)
def test_proxy_header_from_a_client_is_not_trusted(served, header):
    """
    The server tunnel does not read PROXY headers: one sent by a client
    before its ClientHello breaks the handshake instead of claiming an
    address.
    """
    _refused(served, header + _client_hello(), "a PROXY header")

    assert "203.0.113.9" not in served.tunnel.log.split("refused connection")[-1]


def test_a_thousand_silent_connections(served):
    """
    1000 connections that open and send nothing: a legitimate client is
    served while they are open, and each is cut at --connect-timeout.
    """
    before = served.metrics()["ghosttwist.accept.timeout"]
    silent = []
    try:
        for _ in range(1000):
            silent.append(
                socket.create_connection(("127.0.0.1", served.tunnel.port), timeout=30)
            )
        served_meanwhile = served.echo(b"served among the silent")
        cut_count = sum(cut(connection) for connection in silent)
    finally:
        for connection in silent:
            connection.close()

    after = wait_for(
        lambda: (
            (values := served.metrics())["ghosttwist.accept.timeout"] >= before + 1000
            and values
        ),
        "1000 handshake timeouts counted",
    )
    assert served_meanwhile == b"served among the silent"
    assert cut_count == 1000
    assert after["ghosttwist.accept.timeout"] == before + 1000
    assert served.tunnel.process.poll() is None


def test_client_that_stops_reading_keeps_the_tunnel_bounded(tmp_path):
    """
    A backend that keeps sending to a client that stopped reading: the
    tunnel stops reading the backend instead of buffering, so its memory
    stays bounded and the backend's writes stall.
    """
    stalled = threading.Event()
    sent = [0]

    def flood(connection: socket.socket) -> None:
        connection.settimeout(3)
        chunk = b"y" * 65536
        try:
            while sent[0] < 512 * 1024 * 1024:
                sent[0] += connection.send(chunk)
        except TimeoutError:
            stalled.set()

    served = ServedTunnel(tmp_path)
    flooding = Backend(flood)
    try:
        served.tunnel.stop()
        from tests.processes import Tunnel

        served.tunnel = Tunnel(
            tmp_path,
            "server",
            flooding.address,
            "--use-workload-api-addr",
            served.agent.address("backend"),
            "--allow-uri",
            "spiffe://domain.test/frontend",
            name="flooded",
        ).wait_listening()
        rss_before = rss_kib(served.pid)
        with tls_connect(served.tunnel.port, served.context) as connection:
            connection.sendall(b"go")
            assert recv_all(connection, 1)
            wait_for(stalled.is_set, "the backend's writes to stall", 60)
            rss_after = rss_kib(served.pid)
    finally:
        flooding.close()
        served.stop()

    assert sent[0] < 512 * 1024 * 1024
    assert (rss_after - rss_before) / 1024 < 32
