"""
twistd's process options with the plugin: C{--uid}/C{--gid} after binding
a low port, and C{--umask} on a unix listener.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from tests.processes import TWISTD, DevAgent, Process, recv_all, wait_for


def _unprivileged() -> tuple[str, str] | None:
    try:
        pwd.getpwnam("nobody")
        grp.getgrnam("nogroup")
    except KeyError:
        return None
    return "nobody", "nogroup"


def _free_low_port() -> int:
    """
    A port below 1024 on 127.0.0.1 that nothing listens on right now.
    """
    for port in range(1023, 511, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@pytest.fixture
def open_folder(processes):
    """
    A folder an unprivileged user may enter, with a dev agent whose
    sockets anyone may connect to.
    """
    folder = Path(tempfile.mkdtemp(prefix="ghosttwist-uid-"))
    folder.chmod(0o755)
    agent = DevAgent(folder, ("backend", "frontend"))
    processes.append(agent)
    for path in agent.sockets.values():
        path.chmod(0o666)
    yield folder, agent
    agent.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.skipif(_unprivileged() is None, reason="no nobody/nogroup here")
def test_uid_gid_drop_after_binding_a_low_port(
    open_folder, backend, start_tunnel, processes
):
    """
    Run as root with --uid nobody --gid nogroup, the tunnel binds a port
    below 1024 before dropping privileges, runs as nobody and serves.
    """
    folder, agent = open_folder
    user, group = _unprivileged()
    port = _free_low_port()
    limit = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if limit.exists() and int(limit.read_text()) <= port:
        pytest.skip(f"any user may bind port {port} here: it would prove nothing")
    server = Process(
        [
            TWISTD, "-n", "--pidfile=", "--uid", user, "--gid", group,
            "ghosttwist", "server", "--listen", f"127.0.0.1:{port}",
            "--target", backend.address,
            "--use-workload-api-addr", agent.address("backend"),
            "--allow-uri", "spiffe://domain.test/frontend",
        ],
        folder / "server.log",
    )
    processes.append(server)
    server.wait_for_log("listening on")

    status = Path(f"/proc/{server.process.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
    nobody = str(pwd.getpwnam(user).pw_uid)
    assert uids.split()[1:] == [nobody] * 4

    client = start_tunnel(
        "client", f"127.0.0.1:{port}",
        "--use-workload-api-addr", agent.address("frontend"),
        "--verify-uri", "spiffe://domain.test/backend",
    )
    with socket.create_connection(("127.0.0.1", client.port), timeout=15) as conn:
        conn.sendall(b"low port")
        assert recv_all(conn, 8) == b"low port"


@pytest.mark.parametrize("umask, mode", [("0077", 0o700), ("0022", 0o755)])
def test_umask_sets_the_unix_listener_mode(
    tmp_path, agent, backend, processes, umask, mode
):
    """
    twistd's --umask applies to the unix socket the tunnel listens on.
    """
    path = tmp_path / "tunnel.sock"
    server = Process(
        [
            TWISTD, "-n", "--pidfile=", "--umask", umask,
            "ghosttwist", "server", "--listen", f"unix:{path}",
            "--target", backend.address,
            "--use-workload-api-addr", agent.address("backend"),
            "--allow-uri", "spiffe://domain.test/frontend",
        ],
        tmp_path / "server.log",
    )
    processes.append(server)
    server.wait_for_log("listening on")

    wait_for(path.exists, "the socket file")
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
