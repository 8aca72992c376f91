"""
Faults under traffic, with real processes: the Workload API agent killed and
restarted while connections keep coming, the agent away past the SVID's
expiry and back, and SIGTERM while many connections are busy.

The agent signs with a CA the test holds (--ca/--ca-key), as a SPIRE agent
restart keeps its trust domain's CA: a restart is then a fault of the
Workload API connection only, not a CA rotation.
"""

from __future__ import annotations

import signal
import socket
import ssl
import threading
from pathlib import Path

from tests import certs
from tests.processes import (
    Backend,
    DevAgent,
    Tunnel,
    echo,
    free_port,
    port_answers,
    recv_all,
    tls_connect,
    wait_for,
    write_identity,
)
from tests.test_reliability_certs_process import _ca, _key_pem, _leaf, _pem
from tests.test_status_process import status


def _agent_with_ca(folder: Path, root: certs.Issued, *flags: str) -> DevAgent:
    (folder / "ca.pem").write_bytes(_pem(root.cert))
    (folder / "ca-key.pem").write_bytes(_key_pem(root.key))
    return DevAgent(
        folder,
        ("backend", "frontend"),
        "--ca",
        str(folder / "ca.pem"),
        "--ca-key",
        str(folder / "ca-key.pem"),
        *flags,
    )


class _Traffic:
    """
    A thread opening one new connection after another through a plain port,
    each an echo round trip; it counts successes and keeps every failure.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            payload = f"message {self.done}".encode()
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=15
                ) as c:
                    c.sendall(payload)
                    c.shutdown(socket.SHUT_WR)
                    answer = recv_all(c)
            except OSError as error:
                self.failures.append(repr(error))
                continue
            if answer != payload:
                self.failures.append(f"{payload!r} came back as {answer!r}")
            else:
                self.done += 1

    def reaches(self, count: int) -> None:
        wait_for(lambda: self.done >= count or self.failures, f"{count} connections")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _pair(folder: Path, agent: DevAgent, backend: Backend, processes, *flags):
    server = Tunnel(
        folder,
        "server",
        backend.address,
        "--use-workload-api-addr",
        agent.address("backend"),
        "--allow-uri",
        "spiffe://domain.test/frontend",
        *flags,
    )
    processes.append(server)
    server.wait_listening()
    client = Tunnel(
        folder,
        "client",
        server.address,
        "--use-workload-api-addr",
        agent.address("frontend"),
        "--verify-uri",
        "spiffe://domain.test/backend",
        *flags,
    )
    processes.append(client)
    client.wait_listening()
    return server, client


def test_agent_killed_and_restarted_under_traffic_loses_nothing(
    tmp_path, backend, processes
):
    """
    New connections keep flowing through a client/server pair while their
    agent is killed, stays away, and comes back: not one fails, and both
    tunnels count a reconnect.
    """
    root = _ca("restart root")
    agent = _agent_with_ca(tmp_path, root)
    processes.append(agent)
    server, client = _pair(tmp_path, agent, backend, processes)
    traffic = _Traffic(client.port)
    try:
        traffic.reaches(20)
        agent.process.kill()
        agent.wait()
        traffic.reaches(traffic.done + 20)

        restarted = agent.restarted()
        processes.append(restarted)
        server.wait_for_log("reconnected to")
        client.wait_for_log("reconnected to")
        traffic.reaches(traffic.done + 20)
    finally:
        traffic.stop()

    assert traffic.failures == []
    assert traffic.done >= 60


def test_agent_away_past_expiry_then_back(tmp_path, backend, processes):
    """
    With the agent gone, the tunnel's SVID runs out: /_status turns 503,
    the tunnel logs that its certificate expired, and new handshakes fail.
    When the agent returns the tunnel takes the new SVID and serves again,
    without a restart.
    """
    root = _ca("expiry root")
    agent = _agent_with_ca(tmp_path, root, "--svid-ttl", "3s")
    processes.append(agent)
    status_port = free_port()
    server = Tunnel(
        tmp_path,
        "server",
        backend.address,
        "--use-workload-api-addr",
        agent.address("backend"),
        "--allow-uri",
        "spiffe://domain.test/frontend",
        "--status",
        f"http://127.0.0.1:{status_port}",
    )
    processes.append(server)
    server.wait_listening()
    frontend = _leaf(root)
    files = write_identity(
        tmp_path, "frontend", [frontend.cert], frontend.key, [root.cert]
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(str(files["ca"]))
    context.load_cert_chain(str(files["cert"]), str(files["key"]))

    def served() -> bool:
        try:
            with tls_connect(server.port, context, timeout=10) as connection:
                connection.sendall(b"x")
                return recv_all(connection, 1) == b"x"
        except (OSError, ssl.SSLError):
            return False

    assert served()
    agent.process.kill()
    agent.wait()
    _, document = wait_for(
        lambda: (result := status(status_port))[0] == 503 and result,
        "/_status to turn 503",
    )
    assert "expired" in document["identity"]["error"]
    server.wait_for_log("expired at")
    # OpenSSL counts a certificate valid through the second of its
    # notAfter, which the tunnel's own clock may already have passed.
    wait_for(lambda: not served(), "handshakes refused with the expired SVID")

    restarted = agent.restarted()
    processes.append(restarted)
    wait_for(lambda: status(status_port)[0] == 200, "/_status back to 200")
    wait_for(served, "a handshake served again")
    assert server.process.poll() is None


def test_sigterm_under_load_cuts_nothing_before_the_drain_timeout(
    tmp_path, agent, backend, start_tunnel
):
    """
    SIGTERM while 50 connections are busy: the listener closes, every open
    connection keeps exchanging bytes until its client closes it, and the
    process exits 0 without cutting any.
    """
    from tests.processes import svid_files, tls_client

    server = start_tunnel(
        "server",
        backend.address,
        "--use-workload-api-addr",
        agent.address("backend"),
        "--allow-uri",
        "spiffe://domain.test/frontend",
        "--shutdown-timeout",
        "60s",
    )
    files = svid_files(agent, "frontend", tmp_path)
    context = tls_client(files, files["ca"])
    connections = [tls_connect(server.port, context, timeout=30) for _ in range(50)]
    try:
        for number, connection in enumerate(connections):
            connection.sendall(b"before %d" % number)
            assert (
                recv_all(connection, len(b"before %d" % number))
                == b"before %d" % number
            )

        server.signal(signal.SIGTERM)
        server.wait_for_log("shutting down: waiting up to")
        wait_for(lambda: not port_answers(server.port), "the listener to close")
        for round_number in range(3):
            for number, connection in enumerate(connections):
                payload = b"draining %d %d" % (round_number, number)
                connection.sendall(payload)
                assert recv_all(connection, len(payload)) == payload
        assert server.process.poll() is None
    finally:
        for connection in connections:
            connection.close()

    assert server.wait(60) == 0
    assert "shutdown timeout reached" not in server.log


def test_backend_flapping_three_times(tmp_path, agent, start_tunnel):
    """
    The target goes down and up three times: /_status follows it (503 while
    down, 200 while up), each connection made while it is down is closed
    with a log line, each made while it is up is served, and the tunnel
    keeps running throughout.
    """
    from tests.processes import svid_files, tls_client

    target_port, status_port = free_port(), free_port()
    server = start_tunnel(
        "server",
        f"127.0.0.1:{target_port}",
        "--use-workload-api-addr",
        agent.address("backend"),
        "--allow-uri",
        "spiffe://domain.test/frontend",
        "--status",
        f"http://127.0.0.1:{status_port}",
    )
    files = svid_files(agent, "frontend", tmp_path)
    context = tls_client(files, files["ca"])

    def through() -> bytes:
        try:
            with tls_connect(server.port, context, timeout=15) as connection:
                connection.sendall(b"flap")
                return recv_all(connection, 4)
        except (OSError, ssl.SSLError):
            return b""

    for flap in range(3):
        wait_for(lambda: status(status_port)[0] == 503, "503 while the target is down")
        assert through() == b""
        server.wait_for_log("cannot reach", count=flap + 1)

        up = Backend(echo, port=target_port)
        try:
            wait_for(
                lambda: status(status_port)[0] == 200, "200 while the target is up"
            )
            assert through() == b"flap"
        finally:
            up.close()

    assert server.process.poll() is None
