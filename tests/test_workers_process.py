"""
C{--workers N}: worker processes sharing one listening socket under a
supervisor that restarts them and drains them all on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import urllib.request

import pytest

from tests.processes import (
    TWISTD,
    Process,
    environment,
    free_port,
    recv_all,
    twistd,
    wait_for,
)

WORKER = re.compile(r"worker (\d+) \[(\d+)\]: connection from")
STARTED = re.compile(r"started worker (\d+) \[(\d+)\]")


def _round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as connection:
        connection.sendall(payload)
        return recv_all(connection, len(payload))


def _started(log: str) -> dict[int, int]:
    """
    The newest pid of each worker index, from the supervisor's log.
    """
    return {int(index): int(pid) for index, pid in STARTED.findall(log)}


def _served_by(log: str) -> set[int]:
    """
    The pids of the workers that logged an accepted connection.
    """
    return {int(pid) for _, pid in WORKER.findall(log)}


@pytest.fixture
def workers(agent, backend, start_tunnel):
    """
    A server tunnel with two workers, and a client tunnel in front of it.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-uri", "spiffe://domain.test/frontend",
        "--workers", "2", "--shutdown-timeout", "20s",
        wait=False,
    )
    server.wait_for_log("listening on", count=2)
    client = start_tunnel(
        "client", server.address,
        "--use-workload-api-addr", agent.address("frontend"),
        "--verify-uri", "spiffe://domain.test/backend",
    )
    return server, client


def _until_all_serve(server, client, pids: set[int]) -> None:
    """
    Send connections until each worker in C{pids} has logged one.
    """
    sent = []

    def all_served():
        payload = b"connection %d" % len(sent)
        sent.append(payload)
        assert _round_trip(client.port, payload) == payload
        return pids <= _served_by(server.log)

    wait_for(all_served, f"workers {sorted(pids)} to each take a connection")


def test_two_workers_both_take_connections(workers):
    """
    Both workers accept from the one shared socket, and each is a separate
    process the supervisor started.
    """
    server, client = workers
    pids = set(_started(server.log).values())

    assert len(pids) == 2
    assert server.process.pid not in pids
    _until_all_serve(server, client, pids)


def test_killed_worker_is_restarted_and_serves(workers):
    """
    A worker killed with SIGKILL comes back as a new process, which takes
    connections again.
    """
    server, client = workers
    first = _started(server.log)
    os.kill(first[1], signal.SIGKILL)

    server.wait_for_log("restarting it in")
    wait_for(lambda: _started(server.log)[1] != first[1], "worker 1 to start again")
    server.wait_for_log("listening on", count=3)
    again = _started(server.log)

    assert again[2] == first[2]
    _until_all_serve(server, client, {again[1], again[2]})


def test_sigterm_drains_every_worker_and_exits_0(workers):
    """
    SIGTERM to the supervisor reaches the workers; a connection open in a
    worker still carries data while it drains, and the group exits 0.
    """
    server, client = workers
    pids = set(_started(server.log).values())
    with socket.create_connection(("127.0.0.1", client.port), timeout=15) as held:
        held.sendall(b"before")
        assert recv_all(held, 6) == b"before"
        wait_for(lambda: _served_by(server.log), "the held connection to be logged")

        server.signal(signal.SIGTERM)
        server.wait_for_log("waiting up to 20s for 1 open connection")
        held.sendall(b"during")
        assert recv_all(held, 6) == b"during"

    assert server.wait() == 0
    log = server.log
    for pid in pids:
        assert f"[{pid}] exited (status 0)" in log
        assert not os.path.exists(f"/proc/{pid}")


def test_each_worker_reports_its_index_on_the_status_port(
    agent, backend, start_tunnel
):
    """
    With --workers, every worker serves the status port (sharing it with
    SO_REUSEPORT); /_status names the worker that answered and the
    Prometheus metrics carry a worker label.
    """
    status_port = free_port()
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-uri", "spiffe://domain.test/frontend",
        "--workers", "2", "--status", f"http://127.0.0.1:{status_port}",
        wait=False,
    )
    server.wait_for_log("status port serving at", count=2)
    server.wait_for_log("listening on", count=2)
    base = f"http://127.0.0.1:{status_port}"
    seen = set()

    def both_answered():
        with urllib.request.urlopen(f"{base}/_status", timeout=10) as response:
            document = json.load(response)
        assert document["ok"], document
        seen.add(document["worker"])
        return seen == {1, 2}

    wait_for(both_answered, "/_status answers from workers 1 and 2")
    with urllib.request.urlopen(f"{base}/_metrics/prometheus", timeout=10) as response:
        text = response.read().decode()
    assert re.search(r'_accept_total\{worker="[12]"\} ', text), text


def test_workers_that_cannot_start_end_the_supervisor_with_status_1(
    tmp_path, backend, start_tunnel
):
    """
    A mistake that stops the first start of a worker (here, no Workload API
    to get an identity from) is reported, not retried forever.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", f"unix://{tmp_path}/nothing.sock",
        "--use-workload-api-timeout", "1s",
        "--allow-uri", "spiffe://domain.test/frontend",
        "--workers", "2",
        wait=False,
    )

    assert server.wait() == 1
    assert "could not start" in server.log
    assert "no X509-SVID from the Workload API" in server.log


class _Activated(Process):
    """
    A process started with one extra descriptor kept open for it, as
    systemd passes a socket.
    """

    def __init__(self, arguments, log_path, env, fd: int) -> None:
        self.arguments = arguments
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(log_path.parent),
            pass_fds=(fd,),
        )


def _server_flags(agent) -> tuple[str, ...]:
    return (
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-uri", "spiffe://domain.test/frontend",
    )


def test_shutdown_endpoint_stops_the_whole_group(agent, backend, start_tunnel):
    """
    POST /_shutdown, answered by whichever worker, stops the supervisor
    and every worker with status 0; nothing is restarted.
    """
    status_port = free_port()
    server = start_tunnel(
        "server", backend.address, *_server_flags(agent),
        "--workers", "2", "--status", f"http://127.0.0.1:{status_port}",
        "--enable-shutdown",
        wait=False,
    )
    server.wait_for_log("listening on", count=2)
    request = urllib.request.Request(
        f"http://127.0.0.1:{status_port}/_shutdown", method="POST"
    )
    urllib.request.urlopen(request, timeout=10).close()

    assert server.wait() == 0
    assert server.log.count("exited (status 0)") == 2
    assert "restarting" not in server.log


def test_unix_listener_is_shared_and_removed_on_exit(
    tmp_path, agent, backend, start_tunnel, processes
):
    """
    A unix:PATH listener works the same way: the workers serve on it, and
    the supervisor removes the socket file once they have all stopped.
    """
    path = tmp_path / "tunnel.sock"
    server = Process(
        twistd(
            "server", "--listen", f"unix:{path}", "--target", backend.address,
            *_server_flags(agent), "--workers", "2",
        ),
        tmp_path / "unix-server.log",
    )
    processes.append(server)
    server.wait_for_log("listening on", count=2)
    client = start_tunnel(
        "client", f"unix:{path}",
        "--use-workload-api-addr", agent.address("frontend"),
        "--verify-uri", "spiffe://domain.test/backend",
    )

    assert _round_trip(client.port, b"over unix") == b"over unix"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not path.exists()


def test_only_the_supervisor_notifies_systemd(tmp_path, agent, backend, processes):
    """
    With NOTIFY_SOCKET, READY=1 comes once both workers listen, and every
    notification comes from the supervisor's pid, none from a worker.
    """
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    listener.settimeout(0.2)
    port = free_port()
    server = Process(
        twistd(
            "server", "--listen", f"127.0.0.1:{port}", "--target", backend.address,
            *_server_flags(agent), "--workers", "2",
        ),
        tmp_path / "notified-server.log",
        env=environment(NOTIFY_SOCKET=str(path)),
    )
    processes.append(server)
    messages: list[tuple[int, str]] = []

    def received(field: str):
        try:
            data, ancillary, _, _ = listener.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            data, ancillary = b"", []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
                messages.append((pid, data.decode()))
        return any(field in text for _, text in messages)

    try:
        wait_for(lambda: received("READY=1"), "READY=1")
        assert server.log.count("listening on") == 2
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        wait_for(lambda: received("STOPPING=1"), "STOPPING=1")
    finally:
        listener.close()

    assert {pid for pid, _ in messages} == {server.process.pid}


def test_workers_share_a_socket_systemd_passed_in(
    tmp_path, agent, backend, start_tunnel, processes
):
    """
    --listen systemd:NAME with --workers: the supervisor takes the socket
    systemd passed as fd 3 and the workers serve on it.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.set_inheritable(3, True); "
        "os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.argv[2], sys.argv[2:])"
    )
    arguments = [
        sys.executable, "-c", wrapper, str(listener.fileno()),
        *twistd(
            "server", "--listen", "systemd:tunnel", "--target", backend.address,
            *_server_flags(agent), "--workers", "2",
        ),
    ]
    env = environment(LISTEN_FDS="1", LISTEN_FDNAMES="tunnel")
    server = _Activated(arguments, tmp_path / "activated.log", env, listener.fileno())
    processes.append(server)
    listener.close()
    server.wait_for_log("listening on", count=2)
    client = start_tunnel(
        "client", f"127.0.0.1:{port}",
        "--use-workload-api-addr", agent.address("frontend"),
        "--verify-uri", "spiffe://domain.test/backend",
    )

    pids = set(_started(server.log).values())
    _until_all_serve(server, client, pids)


def test_workers_run_from_a_tap_file(tmp_path, agent, backend, processes):
    """
    A .tap written with --workers runs the supervisor and its workers; only
    the configuration was pickled.
    """
    port = free_port()
    tap = tmp_path / "workers.tap"
    written = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "ghosttwist-tap"),
            "--output", str(tap), "server", "--listen", f"127.0.0.1:{port}",
            "--target", backend.address, *_server_flags(agent), "--workers", "2",
        ],
        capture_output=True, text=True, timeout=60, env=environment(),
    )
    assert written.returncode == 0, written.stderr

    server = Process(
        [TWISTD, "-n", "--pidfile=", "-f", str(tap)], tmp_path / "tap-workers.log"
    )
    processes.append(server)
    server.wait_for_log("listening on", count=2)
    assert len(set(_started(server.log).values())) == 2


def test_client_mode_workers_both_take_connections(agent, backend, start_tunnel):
    """
    --workers works in client mode too: two client workers in front of one
    server tunnel both accept plain connections and dial over mTLS.
    """
    server = start_tunnel("server", backend.address, *_server_flags(agent))
    client = start_tunnel(
        "client", server.address,
        "--use-workload-api-addr", agent.address("frontend"),
        "--verify-uri", "spiffe://domain.test/backend",
        "--workers", "2",
        wait=False,
    )
    client.wait_for_log("listening on", count=2)
    pids = set(_started(client.log).values())
    assert len(pids) == 2

    sent = []

    def both_served():
        payload = b"client worker %d" % len(sent)
        sent.append(payload)
        assert _round_trip(client.port, payload) == payload
        return pids <= _served_by(client.log)

    wait_for(both_served, "both client workers to take a connection")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as file:
            status = file.read()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_workers_stop_when_the_supervisor_is_killed(workers):
    """
    A supervisor killed with SIGKILL cannot forward anything: its workers
    see their input close and stop by themselves.
    """
    server, _ = workers
    pids = set(_started(server.log).values())
    server.process.kill()
    server.wait()

    wait_for(lambda: all(_gone(pid) for pid in pids), "both workers to exit")
