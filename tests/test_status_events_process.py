"""
What the status port, the metrics and systemd are told about events of a
real tunnel's life: SVID rotation, shutdown, the agent going away and
coming back, peers that idle past --connect-timeout; and the one-line
refusal of every bad status or metrics flag.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading

import pytest

from tests.processes import (
    Process,
    environment,
    free_port,
    recv_all,
    twistd,
    wait_for,
)
from tests.test_status_process import request, status


def _cut(connection: socket.socket) -> bool:
    """
    Whether the peer ends the connection (EOF or reset) within the deadline.
    """
    try:
        return recv_all(connection) == b""
    except ConnectionResetError:
        return True


def _metrics(port: int) -> dict[str, float]:
    _, _, body = request(port, "/_metrics")
    return {item["metric"]: item["value"] for item in json.loads(body)}


def _metric_reaches(port: int, name: str, value: float) -> dict[str, float]:
    return wait_for(
        lambda: (values := _metrics(port)).get(name) == value and values,
        f"{name} == {value}",
    )


class _Notifications:
    """
    A NOTIFY_SOCKET datagram listener keeping every message it receives.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.messages: list[str] = []
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(path)
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except OSError:
                return

    def having(self, text: str) -> list[str]:
        return [message for message in list(self.messages) if text in message]

    def close(self) -> None:
        self.socket.close()


def test_systemd_hears_rotation_and_stopping(agent, backend, tmp_path, processes):
    """
    A new SVID from the agent sends a STATUS= line naming its serial; SIGTERM
    sends STOPPING=1 before the process exits.
    """
    notifications = _Notifications(str(tmp_path / "notify.sock"))
    tunnel = Process(
        twistd(
            "server",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--target",
            backend.address,
            "--use-workload-api-addr",
            agent.address("backend"),
            "--allow-all",
        ),
        tmp_path / "notified.log",
        env=environment(NOTIFY_SOCKET=notifications.path),
    )
    processes.append(tunnel)
    try:
        wait_for(lambda: notifications.having("READY=1"), "READY=1")
        first = agent.fetch("backend").default_svid.leaf.serial_number

        agent.signal(signal.SIGUSR1)
        rotated = wait_for(
            lambda: (
                (new := agent.fetch("backend").default_svid.leaf.serial_number) != first
                and new
            ),
            "a new SVID from the agent",
        )
        wait_for(
            lambda: notifications.having(f"serial={rotated:x}"),
            "a STATUS= line naming the new serial",
        )

        tunnel.signal(signal.SIGTERM)
        assert tunnel.wait() == 0
        stopping = wait_for(lambda: notifications.having("STOPPING=1"), "STOPPING=1")
    finally:
        notifications.close()

    status_line = notifications.having(f"serial={rotated:x}")[0]
    assert status_line.startswith("STATUS=identity spiffe://domain.test/backend")
    assert "READY=1" not in status_line
    assert "STATUS=stopping" in stopping[0]


def test_workload_api_loss_and_reconnect_are_reported(
    agent, backend, start_tunnel, processes
):
    """
    While the agent is down, /_status says the Workload API is disconnected
    and the connected gauge is 0; once a new agent serves the same socket,
    both say connected again and one reconnect is counted.
    """
    port = free_port()
    start_tunnel(
        "server",
        backend.address,
        "--use-workload-api-addr",
        agent.address("backend"),
        "--allow-all",
        "--status",
        f"http://127.0.0.1:{port}",
    )
    assert status(port)[1]["identity"]["workload_api"]["state"] == "connected"
    assert _metrics(port)["ghosttwist.workload_api.reconnects"] == 0

    agent.process.kill()
    agent.wait()
    down = wait_for(
        lambda: (
            (document := status(port)[1])["identity"]["workload_api"]["state"]
            != "connected"
            and document
        ),
        "/_status to see the agent gone",
    )
    assert _metrics(port)["ghosttwist.workload_api.connected"] == 0

    restarted = agent.restarted()
    processes.append(restarted)
    up = wait_for(
        lambda: (
            (document := status(port)[1])["identity"]["workload_api"]["state"]
            == "connected"
            and document
        ),
        "/_status to see the agent back",
    )
    values = _metric_reaches(port, "ghosttwist.workload_api.reconnects", 1)

    assert down["identity"]["workload_api"]["state"] == "disconnected"
    assert up["identity"]["workload_api"]["state"] == "connected"
    assert values["ghosttwist.workload_api.connected"] == 1


def test_idle_tls_peer_counts_accept_timeout(agent, backend, start_tunnel):
    """
    A peer that opens a TCP connection to a server tunnel and never starts
    its handshake is cut at --connect-timeout, counted in accept.timeout
    and refused.handshake-timeout, not as a success.
    """
    port = free_port()
    tunnel = start_tunnel(
        "server",
        backend.address,
        "--use-workload-api-addr",
        agent.address("backend"),
        "--allow-all",
        "--status",
        f"http://127.0.0.1:{port}",
        "--connect-timeout",
        "1s",
    )

    with socket.create_connection(("127.0.0.1", tunnel.port), timeout=30) as idle:
        assert _cut(idle)
    values = _metric_reaches(port, "ghosttwist.accept.timeout", 1)

    assert values["ghosttwist.refused.handshake-timeout"] == 1
    assert values["ghosttwist.accept.total"] == 1
    assert values["ghosttwist.accept.success"] == 0
    assert values["ghosttwist.conn.timeout"] == 0
    assert values["ghosttwist.conn.open"] == 0


def test_idle_target_counts_conn_timeout(agent, start_tunnel):
    """
    A client tunnel whose server accepts TCP and then idles through the TLS
    handshake gives up at --connect-timeout: conn.timeout counts it, and
    the plain side's accept was a success.
    """
    idle_server = socket.create_server(("127.0.0.1", 0))
    port = free_port()
    tunnel = start_tunnel(
        "client",
        f"127.0.0.1:{idle_server.getsockname()[1]}",
        "--use-workload-api-addr",
        agent.address("frontend"),
        "--status",
        f"http://127.0.0.1:{port}",
        "--connect-timeout",
        "1s",
    )
    try:
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=30) as plain:
            plain.sendall(b"hello?")
            assert _cut(plain)
        values = _metric_reaches(port, "ghosttwist.conn.timeout", 1)
    finally:
        idle_server.close()

    assert values["ghosttwist.accept.success"] == 1
    assert values["ghosttwist.accept.timeout"] == 0
    assert values["ghosttwist.conn.open"] == 0
    assert "timed out during connecting to" in tunnel.log


_BASE = (
    "server",
    "--listen",
    "127.0.0.1:1",
    "--target",
    "127.0.0.1:2",
    "--use-workload-api-addr",
    "unix:///x.sock",
    "--allow-all",
)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--status", "nowhere"], "--status"),
        (["--status", "ftp://127.0.0.1:1"], "--status"),
        (["--status", "http://127.0.0.1:99999"], "--status"),
        (["--status", "unix:"], "--status"),
        (["--status="], "--status needs a value"),
        (["--metrics-graphite", "nowhere"], "--metrics-graphite"),
        (["--metrics-graphite", "127.0.0.1:0"], "--metrics-graphite"),
        (["--metrics-graphite="], "--metrics-graphite needs a value"),
        (["--metrics-url", "ftp://127.0.0.1/x"], "--metrics-url"),
        (["--metrics-url", "http://127.0.0.1:99999/"], "--metrics-url"),
        (["--metrics-url", "https://[::1/"], "--metrics-url"),
        (["--metrics-url", "http://127.0.0.1:0/"], "--metrics-url"),
        (["--metrics-url="], "--metrics-url needs a value"),
        (["--metrics-interval", "ten"], "--metrics-interval"),
        (["--metrics-interval", "0s"], "--metrics-interval"),
        (["--metrics-interval", "-1s"], "--metrics-interval"),
        (["--metrics-prefix", "a/b"], "--metrics-prefix"),
        (["--metrics-prefix", "a b"], "--metrics-prefix"),
        (["--target-status", "127.0.0.1:80"], "--target-status"),
        (["--target-status", "http://"], "--target-status"),
        (["--target-status", "http://127.0.0.1:abc/"], "--target-status"),
        (["--target-status="], "--target-status needs a value"),
    ],
)
def test_bad_monitoring_flags_are_one_line_and_exit_2(flags, message):
    result = subprocess.run(
        twistd(*_BASE, *flags),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
        stdin=subprocess.DEVNULL,
    )

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
