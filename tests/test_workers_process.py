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
import urllib.request

import pytest

from tests.processes import free_port, recv_all, wait_for

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
