"""
C{--workers} in memory: the flag's checks, the restart backoff of the
supervisor, the worker log protocol and the worker label of metrics.
"""

from __future__ import annotations

import json
import pickle
import struct

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from ghosttwist.metrics import TunnelMetrics, prometheus_registry, prometheus_text
from ghosttwist.options import ServerOptions
from ghosttwist.workers import LISTEN_FD, WorkerSupervisor

BASE = [
    "--listen", "127.0.0.1:8443", "--target", "127.0.0.1:8080",
    "--use-workload-api-addr", "unix:///run/agent.sock",
    "--allow-uri", "spiffe://domain.test/frontend",
]


def _options(*extra: str) -> ServerOptions:
    options = ServerOptions()
    options.parseOptions([*BASE, *extra])
    return options


def test_workers_default_to_one():
    assert _options().config.workers == 1
    assert _options("--workers", "3").config.workers == 3


@pytest.mark.parametrize("value", ["0", "-1", "x", "65", "２"])
def test_workers_must_be_a_small_whole_number(value):
    with pytest.raises(usage.UsageError, match="--workers"):
        _options("--workers", value)


@pytest.mark.parametrize("status", ["unix:/run/status.sock", "systemd:status"])
def test_workers_need_a_tcp_status_port(status):
    with pytest.raises(usage.UsageError, match="TCP address"):
        _options("--workers", "2", "--status", status)
    assert _options("--status", status).config.workers == 1


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written = b""
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _Port:
    def fileno(self) -> int:
        return 17


class _Reactor(Clock):
    """
    A clock that records the processes spawned instead of starting them.
    """

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        self.spawned.append((protocol, args, childFDs))
        protocol.makeConnection(_Transport(1000 + len(self.spawned)))


def _supervisor(workers: int = 2):
    reactor = _Reactor()
    supervisor = WorkerSupervisor(_options("--workers", str(workers)).config, reactor)
    supervisor.port = _Port()
    supervisor.running = True
    return supervisor, reactor


def _ended(protocol, failure_type=ProcessTerminated, **kwargs) -> None:
    protocol.processEnded(Failure(failure_type(**kwargs)))


def test_worker_gets_the_socket_and_its_configuration():
    supervisor, reactor = _supervisor()
    supervisor._spawn(2)

    protocol, args, child_fds = reactor.spawned[0]
    assert args[-3:] == ["-m", "ghosttwist.workers", "2"]
    assert child_fds[LISTEN_FD] == 17
    (length,) = struct.unpack("!I", protocol.transport.written[:4])
    config = pickle.loads(protocol.transport.written[4:4 + length])
    assert config.workers == 1
    assert config.listen == supervisor.config.listen


def test_dead_worker_restarts_with_growing_backoff_reset_by_ready():
    supervisor, reactor = _supervisor()
    supervisor._spawn(1)
    first = reactor.spawned[-1][0]
    first.childDataReceived(1, b"ready\t\n")
    _ended(first, signal=9)

    reactor.advance(0.49)
    assert len(reactor.spawned) == 1
    reactor.advance(0.01)
    assert len(reactor.spawned) == 2

    _ended(reactor.spawned[-1][0], exitCode=1)
    reactor.advance(0.99)
    assert len(reactor.spawned) == 2
    reactor.advance(0.01)
    assert len(reactor.spawned) == 3

    third = reactor.spawned[-1][0]
    third.childDataReceived(1, b"ready\t\n")
    _ended(third, signal=9)
    reactor.advance(0.5)
    assert len(reactor.spawned) == 4
    assert supervisor.workers[1] is reactor.spawned[-1][0]


def test_stopping_forwards_sigterm_and_waits_for_every_worker():
    supervisor, reactor = _supervisor()
    supervisor._spawn(1)
    supervisor._spawn(2)
    supervisor.port = None
    one, two = (spawned[0] for spawned in reactor.spawned)

    stopped = supervisor.stopService()
    assert one.transport.signals == ["TERM"] and two.transport.signals == ["TERM"]
    _ended(one, ProcessDone, status=0)
    assert not stopped.called
    _ended(two, ProcessDone, status=0)

    assert stopped.called
    reactor.advance(3600)
    assert len(reactor.spawned) == 2
    assert one.transport.signals == ["TERM"]


def test_worker_lines_are_logged_with_index_pid_and_level():
    supervisor, reactor = _supervisor()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        supervisor._spawn(2)
        protocol = reactor.spawned[0][0]
        protocol.childDataReceived(1, b"warn\tsomething {odd}\ninfo\tpar")
        protocol.childDataReceived(1, b"tial\n")
        protocol.childDataReceived(2, b"Traceback\n")
    finally:
        globalLogPublisher.removeObserver(events.append)

    lines = [
        (event["log_level"], event["text"])
        for event in events
        if event.get("log_format", "").startswith("worker {index}")
    ]
    assert lines == [
        (LogLevel.warn, "something {odd}"),
        (LogLevel.info, "partial"),
        (LogLevel.error, "Traceback"),
    ]
    assert all(event.get("pid") == 1001 for event in events if "text" in event)


def test_metrics_carry_the_worker_index():
    metrics = TunnelMetrics()
    metrics.worker = 2

    records = json.loads(metrics.json_bytes("ghosttwist"))
    assert {record["worker"] for record in records} == {2}
    assert metrics.graphite_lines("ghosttwist").startswith(b"ghosttwist.worker2.")

    text = prometheus_text(prometheus_registry(metrics, "ghosttwist")).decode()
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]
    assert samples
    assert all(sample.labels.get("worker") == "2" for sample in samples)


def test_metrics_without_workers_have_no_worker_label():
    metrics = TunnelMetrics()
    assert "worker" not in json.loads(metrics.json_bytes("ghosttwist"))[0]
    text = prometheus_text(prometheus_registry(metrics, "ghosttwist")).decode()
    assert "worker=" not in text
