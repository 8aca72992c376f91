"""
Helpers shared by the reliability tests: a dev agent, an echo backend and a
server tunnel with a status port that live for a whole test module, and
readers of the tunnel's metrics, status and process figures.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from pathlib import Path

from tests.processes import (
    Backend,
    DevAgent,
    Tunnel,
    echo,
    free_port,
    recv_all,
    svid_files,
    tls_client,
    tls_connect,
)
from tests.test_status_process import request


def metrics(port: int) -> dict[str, float]:
    """
    The JSON metrics of the status port at C{port}, by name.
    """
    _, _, body = request(port, "/_metrics")
    return {item["metric"]: item["value"] for item in json.loads(body)}


def rss_kib(pid: int) -> int:
    """
    The resident memory of process C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """
    How many file descriptors process C{pid} holds.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def cut(connection: socket.socket) -> bool:
    """
    Whether the peer ends the connection (EOF, reset or a TLS alert)
    before the socket's timeout.
    """
    try:
        return recv_all(connection) == b""
    except (ConnectionError, ssl.SSLError):
        return True


class ServedTunnel:
    """
    A dev agent (backend and frontend workloads), an echo backend and a
    server tunnel in front of it allowing the frontend, with a plain HTTP
    status port.
    """

    def __init__(self, folder: Path, *flags: str) -> None:
        self.folder = folder
        self.agent = DevAgent(folder, ("backend", "frontend"))
        self.backend = Backend(echo)
        self.status_port = free_port()
        self.tunnel = Tunnel(
            folder,
            "server",
            self.backend.address,
            "--use-workload-api-addr",
            self.agent.address("backend"),
            "--allow-uri",
            "spiffe://domain.test/frontend",
            "--status",
            f"http://127.0.0.1:{self.status_port}",
            *flags,
        )
        try:
            self.tunnel.wait_listening()
        except BaseException:
            self.stop()
            raise
        files = svid_files(self.agent, "frontend", folder)
        self.context = tls_client(files, files["ca"])

    @property
    def pid(self) -> int:
        return self.tunnel.process.pid

    def metrics(self) -> dict[str, float]:
        return metrics(self.status_port)

    def echo(self, payload: bytes = b"still served") -> bytes:
        """
        One legitimate client's round trip through the tunnel.
        """
        with tls_connect(self.tunnel.port, self.context, timeout=15) as connection:
            connection.sendall(payload)
            return recv_all(connection, len(payload))

    def stop(self) -> None:
        self.tunnel.stop()
        self.agent.stop()
        self.backend.close()
