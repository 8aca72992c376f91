"""
C{--workers N}: one listening socket, N tunnel processes accepting on it.

The process twistd runs becomes a supervisor. It binds C{--listen} once,
in C{privilegedStartService} (before C{--uid}/C{--gid} drop privileges),
never accepts on it, and starts N workers with C{python -m
ghosttwist.workers INDEX}. Each worker inherits the socket as descriptor 3,
reads its configuration from a pipe on its standard input, and is an
ordinary tunnel otherwise: its own Workload API stream, contexts, limits
and drain. The kernel shares incoming connections between the workers.

A worker writes its log events to standard output, one line per event
line, as C{LEVEL<TAB>TEXT}; the supervisor logs them as its own, prefixed
with C{worker INDEX [PID]:}. A worker that dies is started again after a
backoff that grows while restarts keep failing. SIGTERM or SIGINT to the
supervisor closes its copy of the socket, forwards SIGTERM to the workers,
waits for each to drain (within C{--shutdown-timeout}) and exits 0.

A worker also stops, gracefully, when its standard input reaches end of
file: the supervisor is gone, so nothing would restart or watch it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import socket
import struct
import sys

import attrs
from twisted.application.service import Service
from twisted.internet import abstract, defer, fdesc
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, formatEvent
from zope.interface import implementer

from ghosttwist.config import TunnelConfig
from ghosttwist.listeners import _adopt, server_endpoint
from ghosttwist.notify import SystemdNotifier
from ghosttwist.service import (
    TwistdTunnelService,
    _address_of,
    _exit_now,
    _install_graceful_signals,
    _listen_error,
)

log = Logger()

#: The descriptor a worker finds the shared listening socket on.
LISTEN_FD = 3

#: Seconds before a dead worker is started again; doubled per failed
#: restart, up to L{MAX_BACKOFF}.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0

#: A worker's standard-output line that says it accepts connections.
READY = "ready"

#: Left out of a worker's environment: only the supervisor talks to systemd.
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class WorkerSupervisor(Service):
    """
    Binds the listening socket and keeps C{config.workers} worker
    processes running on it.

    Under systemd (C{NOTIFY_SOCKET}), the supervisor alone notifies:
    C{READY=1} once every worker has listened, C{STOPPING=1} on SIGTERM,
    and the watchdog pings; workers are started without C{NOTIFY_SOCKET}.

    @ivar workers: the running workers' protocols, by index.
    """

    def __init__(self, config: TunnelConfig, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.port = None
        self.workers: dict[int, _WorkerProtocol] = {}
        self._restarts: dict[int, object] = {}
        self._failures: dict[int, int] = {}
        self._stopped: defer.Deferred | None = None
        self._kill_timer = None
        self._failed = False
        self._ever_ready: set[int] = set()
        self.notifier = SystemdNotifier(reactor)

    def __getstate__(self) -> dict:
        """
        Only the configuration goes into a .tap; sockets and workers are
        made when it runs.
        """
        return {"config": self.config, "name": self.name, "parent": self.parent}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])
        self.name = state["name"]
        self.parent = state["parent"]

    def privilegedStartService(self) -> None:
        """
        Bind C{--listen} while privileges last; nothing is accepted here.
        """
        super().privilegedStartService()
        factory = Factory()
        factory.noisy = False
        binding = server_endpoint(self.config.listen, self.reactor).listen(factory)
        binding.addCallbacks(self._bound, self._bind_failed)

    def _bound(self, port) -> None:
        port.stopReading()
        self.port = port

    def _bind_failed(self, failure) -> None:
        self._give_up(
            f"cannot listen on {self.config.listen}: {_listen_error(failure)}"
        )

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(_install_graceful_signals, self.reactor)
        if self.port is None and not self._failed:
            # Started without privilegedStartService, as from plain code.
            self.privilegedStartService()
        if self._failed:
            return
        self.notifier.start()
        self.notifier.status(f"starting {self.config.workers} workers")
        log.info(
            "supervising {count} workers on {address}",
            count=self.config.workers,
            address=_address_of(self.port, self.config),
        )
        for index in range(1, self.config.workers + 1):
            self.reactor.callWhenRunning(self._spawn, index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self.running:
            return
        protocol = _WorkerProtocol(self, index)
        arguments = [sys.executable, "-m", "ghosttwist.workers", str(index)]
        env = {
            name: value
            for name, value in os.environ.items()
            if name not in _SUPERVISOR_ONLY
        }
        self.reactor.spawnProcess(
            protocol,
            sys.executable,
            arguments,
            env=env,
            childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: self.port.fileno()},
        )
        config = attrs.evolve(self.config, workers=1)
        payload = pickle.dumps(config)
        protocol.transport.write(struct.pack("!I", len(payload)) + payload)
        self.workers[index] = protocol
        log.info("started worker {index} [{pid}]", index=index, pid=protocol.pid)

    def worker_ready(self, worker: _WorkerProtocol) -> None:
        """
        C{worker} accepts connections: its next death restarts it quickly.
        Once every worker has listened, systemd hears that the tunnel is
        ready.
        """
        self._failures[worker.index] = 0
        first_time = len(self._ever_ready) < self.config.workers
        self._ever_ready.add(worker.index)
        if first_time and len(self._ever_ready) == self.config.workers:
            self.notifier.ready(
                f"{self.config.workers} workers listening on "
                f"{_address_of(self.port, self.config)}"
                if self.port is not None
                else f"{self.config.workers} workers listening"
            )

    def worker_ended(self, worker: _WorkerProtocol, code, signal_name) -> None:
        """
        C{worker} exited with status C{code} or by the named signal.

        While the supervisor runs, a worker is started again, unless its
        very first start failed: that is a mistake (no identity, bad
        flags) reported by ending the supervisor with status 1.
        """

        how = f"signal {signal_name}" if signal_name else f"status {code}"
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]

        if not self.running:
            log.info(
                "worker {index} [{pid}] exited ({how})",
                index=worker.index, pid=worker.pid, how=how,
            )
            if not self.workers and self._stopped is not None:
                self._stopped.callback(None)
            return

        if code == 1 and worker.index not in self._failures:
            self._give_up(f"worker {worker.index} could not start")
            return

        failures = self._failures.get(worker.index, 0) + 1
        self._failures[worker.index] = failures
        delay = min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
        log.warn(
            "worker {index} [{pid}] exited ({how}); restarting it in {delay:g}s",
            index=worker.index, pid=worker.pid, how=how, delay=delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(
            delay, self._spawn, worker.index
        )
        self.notifier.status(f"worker {worker.index} exited ({how}); restarting")

    def _give_up(self, message: str) -> None:
        """
        Log C{message} as the reason the tunnel cannot run; exit status 1.
        """
        self._failed = True
        log.critical("ghosttwist: {message}", message=message)
        atexit.register(_exit_now, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self):
        super().stopService()
        self.notifier.stopping()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()

        stopped = None
        if self.port is not None:
            # Close this copy first: the workers' copies close as they stop.
            stopped = self.port.stopListening()
            self.port = None
        if not self.workers:
            self.notifier.stop()
            return stopped

        self._stopped = defer.Deferred()
        self._stopped.addBoth(self._notifier_stop)
        for worker in list(self.workers.values()):
            worker.signal("TERM")
        grace = self.config.shutdown_timeout + 10.0
        self._kill_timer = self.reactor.callLater(grace, self._kill_stragglers)
        self._stopped.addBoth(self._cancel_kill_timer)
        return defer.DeferredList(
            [d for d in (self._stopped, stopped) if d is not None], consumeErrors=True
        )

    def _notifier_stop(self, result):
        self.notifier.stop()
        return result

    def _kill_stragglers(self) -> None:
        self._kill_timer = None
        for worker in list(self.workers.values()):
            log.warn(
                "worker {index} [{pid}] did not stop in time; killing it",
                index=worker.index, pid=worker.pid,
            )
            worker.signal("KILL")

    def _cancel_kill_timer(self, result):
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        return result


class _WorkerProtocol(ProcessProtocol):
    """
    One worker process as its supervisor sees it: its log lines and its end.
    """

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid = None
        self.ready = False
        self._buffers = {1: b"", 2: b""}

    def makeConnection(self, transport) -> None:
        self.pid = transport.pid
        super().makeConnection(transport)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self._buffers:
            return
        lines = (self._buffers[fd] + data).split(b"\n")
        self._buffers[fd] = lines.pop()
        for line in lines:
            self._line(fd, line.decode("utf-8", "replace"))

    def _line(self, fd: int, line: str) -> None:
        level = LogLevel.error
        text = line
        if fd == 1:
            name, _, text = line.partition("\t")
            if name == READY:
                self.ready = True
                self.supervisor.worker_ready(self)
                return
            try:
                level = LogLevel.levelWithName(name)
            except InvalidLogLevelError:
                level, text = LogLevel.info, line
        log.emit(
            level, "worker {index} [{pid}]: {text}",
            index=self.index, pid=self.pid, text=text,
        )

    def signal(self, name: str) -> None:
        """
        Send the named signal, unless the worker has already exited.
        """
        with contextlib.suppress(ProcessExitedAlready, OSError):
            self.transport.signalProcess(name)

    def processEnded(self, reason) -> None:
        for fd in (1, 2):
            if self._buffers[fd]:
                self._line(fd, self._buffers[fd].decode("utf-8", "replace"))
                self._buffers[fd] = b""
        value = reason.value
        self.supervisor.worker_ended(
            self, getattr(value, "exitCode", None), _signal_name(value)
        )


def _signal_name(value) -> str | None:
    number = getattr(value, "signal", None)
    if not number:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# The worker's side.


@implementer(IStreamServerEndpoint)
class InheritedEndpoint:
    """
    Listens on a listening socket this process inherited as C{fd}; the
    supervisor that made it removes a unix socket file, not the worker.
    """

    def __init__(self, reactor, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd

    def listen(self, factory) -> defer.Deferred:
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        probe = socket.socket(fileno=os.dup(self.fd))
        family = probe.family
        probe.close()
        os.set_blocking(self.fd, False)
        port = _adopt(self.reactor, self.fd, family, factory, owns_path=False)
        os.close(self.fd)
        return port


class WorkerTunnelService(TwistdTunnelService):
    """
    A tunnel that listens on the supervisor's socket instead of binding its
    own, and tells the supervisor when it accepts connections.
    """

    def __init__(self, config: TunnelConfig, reactor=None, index: int = 1) -> None:
        super().__init__(config, reactor)
        self.index = index
        self.monitor.health.worker = index
        self.factory.metrics.worker = index
        self.ready.addCallback(self._tell_ready)

    def _server_endpoint(self):
        return InheritedEndpoint(self.reactor, LISTEN_FD)

    def _tell_ready(self, port):
        _write_line(READY, "")
        return port

    def shutdown(self, why: str) -> None:
        """
        C{POST /_shutdown} stops the whole group, not this worker alone
        (which would only be restarted): ask the supervisor.
        """
        log.info("asking the supervisor to stop: {why}", why=why)
        os.kill(os.getppid(), signal.SIGTERM)


class _ParentWatch(abstract.FileDescriptor):
    """
    Reads the worker's standard input until end of file, which means the
    supervisor has gone, and then stops the worker gracefully.
    """

    def __init__(self, reactor, fd: int, gone) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.gone = gone
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self):
        return fdesc.readFromFD(self.fd, lambda data: None)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        gone, self.gone = self.gone, None
        if gone is not None:
            gone()

    def unwatch(self) -> None:
        """
        The worker is stopping anyway: its input closing means nothing.
        """
        self.gone = None
        self.stopReading()


def _write_line(level: str, text: str) -> None:
    out = sys.stdout
    for line in text.split("\n") or [""]:
        out.write(f"{level}\t{line}\n")
    out.flush()


def _observer(event: dict) -> None:
    """
    Write a log event as C{LEVEL<TAB>TEXT} lines for the supervisor.
    """
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
    level = event.get("log_level", LogLevel.info)
    try:
        _write_line(level.name, text)
    except (OSError, ValueError):
        pass


def _read_config(fd: int) -> TunnelConfig:
    def read(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = os.read(fd, count - len(data))
            if not chunk:
                raise SystemExit(1)
            data += chunk
        return data

    (length,) = struct.unpack("!I", read(4))
    return pickle.loads(read(length))


def main(argv: list[str]) -> None:
    """
    A worker: C{python -m ghosttwist.workers INDEX}, started by a
    L{WorkerSupervisor}, never by hand.
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    index = int(argv[1])
    config = _read_config(0)
    globalLogBeginner.beginLoggingTo([_observer], redirectStandardIO=False)

    service = WorkerTunnelService(config, reactor, index)
    watch = _ParentWatch(
        reactor, 0, lambda: _stop(reactor, "the supervisor is gone")
    )
    reactor.callWhenRunning(watch.startReading)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", watch.unwatch)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def _stop(reactor, why: str) -> None:
    log.info("stopping gracefully: {why}", why=why)
    if reactor.running:
        reactor.stop()


if __name__ == "__main__":
    main(sys.argv)
