"""
Rotation under load: the dev agent re-issues every SVID each second
(--svid-ttl 2s) and rotates its CA once (SIGUSR2) while new connections
keep coming through a client/server pair. Not one fails, and every
connection made straight to the server sees the certificate the server had
in service when it was made.
"""

from __future__ import annotations

import signal
import ssl
import threading

from tests.processes import (
    Backend,
    DevAgent,
    Tunnel,
    echo,
    free_port,
    peer_serial,
    recv_all,
    svid_files,
    tls_client,
    tls_connect,
)
from tests.test_reliability_faults_process import _Traffic
from tests.test_status_process import status


class _Observer:
    """
    A thread connecting straight to the server tunnel with a freshly fetched
    frontend SVID, recording for each connection the serial it saw and the
    serials /_status reported just before and just after.
    """

    def __init__(self, agent: DevAgent, server: Tunnel, status_port: int, folder):
        self.agent = agent
        self.server = server
        self.status_port = status_port
        self.folder = folder
        self.seen: list[tuple[str, str, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _serial(self) -> str:
        return status(self.status_port)[1]["identity"]["serial"]

    def _run(self) -> None:
        while not self._stop.is_set():
            files = svid_files(self.agent, "frontend", self.folder)
            context = tls_client(files, files["ca"])
            before = self._serial()
            try:
                with tls_connect(self.server.port, context, timeout=15) as connection:
                    seen = peer_serial(connection)
                    connection.sendall(b"seen")
                    if recv_all(connection, 4) != b"seen":
                        self.failures.append("no echo")
            except (OSError, ssl.SSLError) as error:
                self.failures.append(repr(error))
                continue
            self.seen.append((before, seen, self._serial()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_rotation_every_second_and_a_ca_rotation_lose_nothing(tmp_path, processes):
    agent = DevAgent(tmp_path, ("backend", "frontend"), "--svid-ttl", "2s")
    processes.append(agent)
    backend = Backend(echo)
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
    client = Tunnel(
        tmp_path,
        "client",
        server.address,
        "--use-workload-api-addr",
        agent.address("frontend"),
        "--verify-uri",
        "spiffe://domain.test/backend",
    )
    processes.append(client)
    client.wait_listening()

    traffic = _Traffic(client.port)
    observer = _Observer(agent, server, status_port, tmp_path)
    try:
        server.wait_for_log("identity updated", count=6)
        agent.signal(signal.SIGUSR2)
        server.wait_for_log("domain.test(2 CA")
        client.wait_for_log("domain.test(2 CA")
        server.wait_for_log("identity updated", count=16)
        client.wait_for_log("identity updated", count=16)
        traffic.reaches(traffic.done + 10)
    finally:
        traffic.stop()
        observer.stop()
        backend.close()

    assert traffic.failures == []
    assert observer.failures == []
    assert traffic.done >= 50
    assert len(observer.seen) >= 10
    stale = [row for row in observer.seen if row[1] not in (row[0], row[2])]
    assert stale == []
    assert len({row[1] for row in observer.seen}) >= 3
