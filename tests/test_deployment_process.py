"""
Running the tunnel the ways a supervisor does: from a .tac file, from a
.tap file, and with twistd's process options.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.processes import (
    REPOSITORY,
    TWISTD,
    Process,
    environment,
    free_port,
    recv_all,
    wait_for,
)

TAP_COMMAND = os.path.join(os.path.dirname(sys.executable), "ghosttwist-tap")


def _round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as connection:
        connection.sendall(payload)
        return recv_all(connection, len(payload))


def _client(start_tunnel, agent, server_port: int):
    return start_tunnel(
        "client", f"127.0.0.1:{server_port}",
        "--use-workload-api-addr", agent.address("frontend"),
        "--verify-uri", "spiffe://domain.test/backend",
    )


def test_tac_file_from_the_docs_runs_under_twistd(
    tmp_path, agent, backend, start_tunnel, processes
):
    """
    docs/examples/tunnel.tac, run with twistd -ny, serves as a server tunnel.
    """
    port = free_port()
    server = Process(
        [TWISTD, "--pidfile=", "-ny", str(REPOSITORY / "docs/examples/tunnel.tac")],
        tmp_path / "tac.log",
        env=environment(
            LISTEN=f"127.0.0.1:{port}",
            TARGET=backend.address,
            WORKLOAD_API=agent.address("backend"),
        ),
    )
    processes.append(server)
    server.wait_for_log("listening on")
    client = _client(start_tunnel, agent, port)

    assert _round_trip(client.port, b"through a tac") == b"through a tac"


def test_tap_file_is_written_then_run(tmp_path, agent, backend, start_tunnel, processes):
    """
    ghosttwist-tap writes a .tap for given flags; twistd -f runs it, and its
    runtime state is built on start, not unpickled.
    """
    port = free_port()
    tap = tmp_path / "tunnel.tap"
    written = subprocess.run(
        [
            TAP_COMMAND, "--output", str(tap), "server",
            "--listen", f"127.0.0.1:{port}", "--target", backend.address,
            "--use-workload-api-addr", agent.address("backend"),
            "--allow-uri", "spiffe://domain.test/frontend",
        ],
        capture_output=True, text=True, timeout=60, env=environment(),
    )
    assert written.returncode == 0, written.stderr
    modules = _pickled_modules(tap.read_bytes())
    assert "ghosttwist.config" in modules
    assert not modules & {"OpenSSL.SSL", "grpc", "threading", "socket"}

    server = Process(
        [TWISTD, "-n", "--pidfile=", "-f", str(tap)], tmp_path / "tap.log"
    )
    processes.append(server)
    server.wait_for_log("listening on")
    client = _client(start_tunnel, agent, port)

    assert _round_trip(client.port, b"through a tap") == b"through a tap"


def _pickled_modules(data: bytes) -> set[str]:
    """
    The modules whose classes or functions a pickle refers to.
    """
    import pickletools

    modules, strings = set(), []
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(argument)
        elif opcode.name == "STACK_GLOBAL":
            modules.add(strings[-2])
        elif opcode.name == "GLOBAL":
            modules.add(argument.split(" ")[0])
    return modules


def test_tap_command_refuses_bad_flags_in_one_line(tmp_path):
    """
    The .tap writer checks flags exactly as the command line does.
    """
    result = subprocess.run(
        [TAP_COMMAND, "--output", str(tmp_path / "x.tap"), "server", "--listen", "x"],
        capture_output=True, text=True, timeout=60, env=environment(),
    )

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.tap").exists()


def test_daemon_mode_with_pidfile_and_logfile(tmp_path, agent, backend, start_tunnel):
    """
    twistd forks into the background before the service starts; the
    Workload API stream is opened after the fork and the tunnel serves.
    """
    port = free_port()
    pidfile, logfile = tmp_path / "server.pid", tmp_path / "server.log"
    started = subprocess.run(
        [
            TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile),
            "ghosttwist", "server", "--listen", f"127.0.0.1:{port}",
            "--target", backend.address,
            "--use-workload-api-addr", agent.address("backend"),
            "--allow-uri", "spiffe://domain.test/frontend",
        ],
        capture_output=True, text=True, timeout=60, env=environment(),
        cwd=tmp_path,
    )
    assert started.returncode == 0, started.stderr
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "pid"))
    try:
        wait_for(lambda: "listening on" in logfile.read_text(), "the daemon to listen")
        client = _client(start_tunnel, agent, port)
        assert _round_trip(client.port, b"daemon") == b"daemon"
    finally:
        os.kill(pid, 15)
    wait_for(lambda: not pidfile.exists(), "the daemon to exit and remove its pidfile")


def test_embedding_example_from_the_docs(agent, backend, start_tunnel):
    """
    docs/examples/embed.py builds a TunnelService in its own program and
    sends a line through it to the echo backend behind a server tunnel.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-uri", "spiffe://domain.test/frontend",
    )

    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "docs/examples/embed.py"), server.address],
        capture_output=True, text=True, timeout=60,
        env=environment(SPIFFE_ENDPOINT_SOCKET=agent.address("frontend")),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ping through an embedded tunnel"
