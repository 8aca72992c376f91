"""
Load and churn through real tunnels, sized for CI: 500 concurrent
connections through a pair, 5,000 connections opened and closed with
descriptors and memory back near where they started, 64 MiB each way at
once with equal SHA-256 at both ends, and 1-byte writes.

benchmarks/soak.py runs the full-size versions (2,000 concurrent, 20,000
churn, 1 GiB each way).
"""

from __future__ import annotations

import hashlib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.processes import Backend, recv_all, tls_connect, wait_for
from tests.reliability import ServedTunnel, metrics, open_fds, rss_kib

_MIB = 1024 * 1024


@pytest.fixture
def pair(agent, backend, start_tunnel):
    """
    A client/server pair in front of the echo backend, the client with a
    status port.
    """
    from tests.processes import free_port

    server = start_tunnel(
        "server",
        backend.address,
        "--use-workload-api-addr",
        agent.address("backend"),
        "--allow-uri",
        "spiffe://domain.test/frontend",
    )
    status_port = free_port()
    client = start_tunnel(
        "client",
        server.address,
        "--use-workload-api-addr",
        agent.address("frontend"),
        "--verify-uri",
        "spiffe://domain.test/backend",
        "--status",
        f"http://127.0.0.1:{status_port}",
    )
    client.status_port = status_port
    return server, client


def test_500_concurrent_connections_through_a_pair(pair):
    """
    500 connections open at once through client and server tunnels; each
    gets its own bytes back, and conn.open saw all of them.
    """
    _, client = pair
    connections = []
    try:
        for _ in range(500):
            connections.append(
                socket.create_connection(("127.0.0.1", client.port), timeout=60)
            )
        for number, connection in enumerate(connections):
            connection.sendall(b"%06d" % number)
        answers = [recv_all(connection, 6) for connection in connections]
        peak = metrics(client.status_port)["ghosttwist.conn.open"]
    finally:
        for connection in connections:
            connection.close()

    assert answers == [b"%06d" % number for number in range(500)]
    assert peak == 500
    wait_for(
        lambda: metrics(client.status_port)["ghosttwist.conn.open"] == 0,
        "every connection closed",
    )


def test_churn_of_5000_connections_leaks_nothing(tmp_path):
    """
    5,000 TLS connections opened, used and closed: afterwards the tunnel
    holds as many descriptors as before (give or take a few) and its memory
    grew by little.
    """
    served = ServedTunnel(tmp_path)
    try:
        served.echo()
        fds_before, rss_before = open_fds(served.pid), rss_kib(served.pid)

        def one(number: int) -> bool:
            payload = b"%05d" % number
            with tls_connect(served.tunnel.port, served.context, timeout=30) as c:
                c.sendall(payload)
                return recv_all(c, 5) == payload

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(5000)))
        wait_for(lambda: served.metrics()["ghosttwist.conn.open"] == 0, "all closed")
        fds_after = wait_for(
            lambda: (count := open_fds(served.pid)) <= fds_before + 4 and count,
            "descriptors back near the start",
        )
        rss_after = rss_kib(served.pid)
        accepted = served.metrics()["ghosttwist.accept.success"]
    finally:
        served.stop()

    assert all(results)
    assert accepted >= 5000
    assert fds_after <= fds_before + 4
    assert (rss_after - rss_before) / 1024 < 24, (rss_before, rss_after)


def _stream(seed: bytes, size: int):
    """
    C{size} bytes of a deterministic, incompressible stream, in 64 KiB
    chunks.
    """
    block = hashlib.shake_256(seed).digest(65536)
    for offset in range(0, size, len(block)):
        yield block[: size - offset] if size - offset < len(block) else block


def test_64_mib_each_way_at_once_arrives_intact(agent, start_tunnel, tmp_path):
    """
    The client and the backend each send 64 MiB while reading the other's
    64 MiB; the SHA-256 of what each received equals that of what the other
    sent.
    """
    size = 64 * _MIB
    received: dict[str, str] = {}

    def duplex(connection: socket.socket, name: str, seed: bytes) -> str:
        sent = hashlib.sha256()

        def send() -> None:
            for chunk in _stream(seed, size):
                connection.sendall(chunk)
                sent.update(chunk)
            connection.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest, total = hashlib.sha256(), 0
        while chunk := connection.recv(262144):
            digest.update(chunk)
            total += len(chunk)
        sender.join()
        received[name] = digest.hexdigest()
        received[f"{name}-bytes"] = total
        return sent.hexdigest()

    sent_by_backend: list[str] = []
    backend = Backend(
        lambda connection: sent_by_backend.append(duplex(connection, "backend", b"b"))
    )
    try:
        server = start_tunnel(
            "server",
            backend.address,
            "--use-workload-api-addr",
            agent.address("backend"),
            "--allow-uri",
            "spiffe://domain.test/frontend",
        )
        client = start_tunnel(
            "client",
            server.address,
            "--use-workload-api-addr",
            agent.address("frontend"),
            "--verify-uri",
            "spiffe://domain.test/backend",
        )
        with socket.create_connection(("127.0.0.1", client.port), timeout=60) as c:
            sent_by_client = duplex(c, "client", b"c")
        wait_for(lambda: sent_by_backend, "the backend to finish")
    finally:
        backend.close()

    assert received["client-bytes"] == received["backend-bytes"] == size
    assert received["backend"] == sent_by_client
    assert received["client"] == sent_by_backend[0]


def test_one_byte_writes_arrive_in_order(pair):
    """
    4,000 writes of one byte each, with Nagle off, come back in order.
    """
    _, client = pair
    payload = bytes(number % 251 for number in range(4000))
    with socket.create_connection(("127.0.0.1", client.port), timeout=60) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in payload:
            c.send(bytes([byte]))
        c.shutdown(socket.SHUT_WR)
        echoed = recv_all(c)

    assert echoed == payload
