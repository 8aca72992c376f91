"""
Attacks on TLS session resumption, against real tunnels.

A resumed session skips certificate verification; what a full handshake
would refuse now must not get in by resuming an older session. A session
keeps the peer's leaf but not the chain above it, so a CA in that chain
that has expired since is the case a judgement of the leaf alone misses.
The attackers are pyOpenSSL clients that offer a saved session, and an
ssl-module server that issues tickets to a client tunnel.
"""

from __future__ import annotations

import datetime
import json
import secrets
import signal
import socket
import ssl
import struct
import threading
import urllib.request
from pathlib import Path

import pytest
from OpenSSL import SSL

from tests.pki import Pki, key_pem, mint, pem
from tests.processes import free_port, svid_files, wait_for
from tests.test_status_process import start_server
from tests.test_reliability_resumption_process import (
    _Client,
    _files_server,
    _session_reused,
)

_VERSIONS = ("TLSv1.2", "TLSv1.3")

# X.509 validity has whole seconds; past this, "now" is surely after it.
_CLOCK_SLACK = datetime.timedelta(seconds=1)
_LIFE = datetime.timedelta(seconds=3)


def _short_chain(
    folder: Path, pki: Pki, name: str, short: str = "intermediate", **names
):
    """
    A leaf under an intermediate of C{pki}'s root, one of them (C{short})
    expiring in a few seconds, the other in a day; returns the chain and
    key files, and when the short-lived one ends.
    """
    ends = datetime.datetime.now(datetime.UTC) + _LIFE
    intermediate = mint(
        f"{name} intermediate",
        ca=True,
        issuer=pki.root,
        not_after=ends if short == "intermediate" else None,
    )
    leaf = mint(
        name,
        issuer=intermediate,
        not_after=ends if short == "leaf" else None,
        **names,
    )
    cert, key = folder / f"{name}-chain.pem", folder / f"{name}-key.pem"
    cert.write_bytes(pem(leaf.cert, intermediate.cert))
    key.write_bytes(key_pem(leaf.key))
    return cert, key, ends


def _after(moment: datetime.datetime) -> None:
    wait_for(
        lambda: datetime.datetime.now(datetime.UTC) > moment + _CLOCK_SLACK,
        "a certificate to expire",
    )


def _refused(status_port: int, reason: str) -> int:
    url = f"http://127.0.0.1:{status_port}/_metrics/json"
    with urllib.request.urlopen(url, timeout=10) as answer:
        metrics = json.loads(answer.read())
    return sum(m["value"] for m in metrics if m["metric"].endswith(f"refused.{reason}"))


@pytest.mark.parametrize("version", _VERSIONS)
def test_session_leaning_on_an_expired_intermediate_does_not_get_in(
    tmp_path, backend, start_tunnel, version
):
    """
    A client whose intermediate expires before its leaf connects and keeps
    its session; once the intermediate has expired a full handshake is
    refused, and so is the session: the tunnel voids its sessions then.
    A client whose chain is sound makes a full handshake and gets in.
    """
    pki = Pki(tmp_path)
    status = free_port()
    server = _files_server(
        start_tunnel,
        backend,
        pki,
        tmp_path,
        "--allow-cn",
        "client1",
        "--allow-cn",
        "sound",
        "--status",
        f"http://127.0.0.1:{status}",
    )
    cert, key, ends = _short_chain(tmp_path, pki, "client1")
    attacker = _Client(cert, key, version)
    sound = _Client(*pki.split(pki.issue("sound"), "sound"), version)
    assert attacker.exchange(server.port) == (b"probe", False)
    assert sound.exchange(server.port) == (b"probe", False)
    reached = backend.accepted

    _after(ends)
    assert attacker.exchange(server.port) == (b"", False)

    assert backend.accepted == reached
    assert "expired" in server.wait_for_log("refused connection from")
    assert server.wait_for_log("sessions from before are void")
    assert _refused(status, "expired") == 1
    assert sound.exchange(server.port) == (b"probe", False)


class _TicketServer:
    """
    An ssl-module echo server that issues session tickets: it stands for
    a server a client tunnel dials. It records the bytes each connection
    brought.
    """

    def __init__(self, chain: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(chain), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.resumed: list[bool] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            connection.settimeout(10)
            try:
                with self.context.wrap_socket(connection, server_side=True) as tls:
                    self.resumed.append(tls.session_reused)
                    data = tls.recv(64)
                    self.received.append(data)
                    tls.sendall(data)
                    # A close_notify keeps the client's session resumable.
                    tls.unwrap()
            except (OSError, ssl.SSLError):
                self.received.append(b"")

    def close(self) -> None:
        self.listener.close()


def _through(port: int, probe: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(probe)
        try:
            return raw.recv(64)
        except OSError:
            return b""


@pytest.mark.parametrize("short", ["intermediate", "leaf"])
def test_client_tunnel_does_not_resume_with_a_server_whose_chain_expired(
    tmp_path, start_tunnel, short
):
    """
    A client tunnel resumes with its server; once the server's
    intermediate, or its own certificate, has expired, the client's bytes
    do not reach it over the session kept from before.
    """
    pki = Pki(tmp_path)
    chain, key, ends = _short_chain(tmp_path, pki, "server", short, dns=["localhost"])
    hostile = _TicketServer(chain, key)
    client_cert, client_key = pki.split(pki.issue("client"), "client")
    client = start_tunnel(
        "client",
        f"localhost:{hostile.port}",
        "--cert",
        str(client_cert),
        "--key",
        str(client_key),
        "--cacert",
        str(pki.cacert),
    )
    try:
        assert _through(client.port, b"first") == b"first"
        assert _through(client.port, b"second") == b"second"
        assert hostile.resumed == [False, True]

        _after(ends)
        assert _through(client.port, b"secret") == b""
    finally:
        hostile.close()

    assert b"secret" not in hostile.received
    assert "expired" in client.wait_for_log("refused")


@pytest.mark.parametrize("signal_number", [signal.SIGUSR1, signal.SIGUSR2])
def test_svid_or_ca_rotation_voids_every_session(
    tmp_path, agent, backend, start_tunnel, signal_number
):
    """
    After the agent re-issues the SVIDs (SIGUSR1) or rotates its CA
    (SIGUSR2), a session from before does not resume: the client makes a
    full handshake (its SVID is still good) instead.
    """
    server = start_server(start_tunnel, agent, backend.address)
    files = svid_files(agent, "frontend", tmp_path)
    client = _Client(files["cert"], files["key"], "TLSv1.3")
    assert client.exchange(server.port) == (b"probe", False)
    assert client.exchange(server.port) == (b"probe", True)

    agent.signal(signal_number)
    server.wait_for_log("identity updated", count=2)

    assert client.exchange(server.port) == (b"probe", False)


@pytest.mark.parametrize("version", _VERSIONS)
def test_session_of_one_tunnel_does_not_resume_on_another(
    tmp_path, agent, backend, start_tunnel, version
):
    """
    Two tunnels with the same flags and identity, in two processes: a
    session from one makes a full handshake on the other, and one from
    the tunnel port does not resume on the HTTPS status port.
    """
    status = free_port()
    flags = (
        "--use-workload-api-addr",
        agent.address("backend"),
        "--allow-uri",
        "spiffe://domain.test/frontend",
    )
    first = start_tunnel("server", backend.address, *flags, name="first")
    second = start_tunnel(
        "server",
        backend.address,
        *flags,
        "--status",
        f"https://127.0.0.1:{status}",
        name="second",
    )
    second.wait_for_log("status port serving")
    files = svid_files(agent, "frontend", tmp_path)
    client = _Client(files["cert"], files["key"], version)
    assert client.exchange(first.port) == (b"probe", False)
    kept = client.session

    assert _resumes(client.context, first.port, kept)

    assert client.exchange(second.port) == (b"probe", False)
    assert not _resumes(client.context, status, kept)


def _resumes(context: SSL.Context, port: int, session: SSL.Session) -> bool:
    """
    Whether a handshake on C{port} offering C{session} resumes it.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    # pyOpenSSL wants a blocking socket; the kernel bounds each wait.
    raw.settimeout(None)
    limit = struct.pack("ll", 10, 0)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    connection = SSL.Connection(context, raw)
    connection.set_connect_state()
    connection.set_session(session)
    try:
        connection.do_handshake()
        # A TLS 1.3 server hears the client's Finished only now.
        connection.sendall(b"x")
        # OpenSSL spoils the session of a connection freed without this.
        connection.shutdown()
    except SSL.Error:
        pass
    reused = _session_reused(connection)
    raw.close()
    return reused


@pytest.mark.parametrize("version", _VERSIONS)
def test_ticket_without_its_secret_does_not_get_in(
    tmp_path, agent, backend, start_tunnel, version
):
    """
    A ticket crosses the wire in the clear (TLS 1.2) or can be copied from
    a client; offered with any other secret than the session's, it gets
    no one in (the session's certificate is one the tunnel allows), and
    the tunnel goes on serving.
    """
    from OpenSSL._util import ffi, lib

    server = start_server(start_tunnel, agent, backend.address)
    frontend = svid_files(agent, "frontend", tmp_path)
    thief = _Client(frontend["cert"], frontend["key"], version)
    assert thief.exchange(server.port) == (b"probe", False)
    reached = backend.accepted

    guess = secrets.token_bytes(48)
    assert lib.SSL_SESSION_set1_master_key(
        thief.session._session, ffi.from_buffer(guess), len(guess)
    )
    assert thief.exchange(server.port)[0] == b""

    assert backend.accepted == reached
    fresh = _Client(frontend["cert"], frontend["key"], version)
    assert fresh.exchange(server.port) == (b"probe", False)


def test_tickets_allow_no_early_data(tmp_path, agent, backend, start_tunnel):
    """
    A TLS 1.3 ticket from a tunnel allows no 0-RTT data: bytes sent before
    the handshake ends, and so before the peer is judged, would reach the
    target unjudged and could be replayed.
    """
    from OpenSSL._util import lib

    server = start_server(start_tunnel, agent, backend.address)
    files = svid_files(agent, "frontend", tmp_path)
    client = _Client(files["cert"], files["key"], "TLSv1.3")
    assert client.exchange(server.port) == (b"probe", False)

    assert lib.SSL_SESSION_get_max_early_data(client.session._session) == 0
