"""
Fixtures shared by the integration tests: a dev agent, an echo backend and
the tunnels, each torn down when its test ends.
"""

from __future__ import annotations

import pytest

from tests.processes import Backend, DevAgent, Tunnel, echo


@pytest.fixture
def processes():
    """
    Collects every process a test starts and stops them all afterwards.
    """
    started = []
    yield started
    for process in reversed(started):
        process.stop()


@pytest.fixture
def agent(tmp_path, processes) -> DevAgent:
    """
    A dev agent for domain.test with backend, frontend and intruder
    workloads.
    """
    dev_agent = DevAgent(tmp_path, ("backend", "frontend", "intruder"))
    processes.append(dev_agent)
    return dev_agent


@pytest.fixture
def backend():
    server = Backend(echo)
    yield server
    server.close()


@pytest.fixture
def start_tunnel(tmp_path, processes):
    """
    Start C{twistd -n ghosttwist MODE ...} and wait until it listens.
    """

    def start(mode: str, target: str, *flags: str, name=None, wait=True) -> Tunnel:
        tunnel = Tunnel(tmp_path, mode, target, *flags, name=name)
        processes.append(tunnel)
        if wait:
            tunnel.wait_listening()
        return tunnel

    return start


@pytest.fixture
def pair(agent, backend, start_tunnel):
    """
    A server tunnel in front of the echo backend and a client tunnel in
    front of the server, authorizing each other by SPIFFE ID.
    """
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
    return server, client
