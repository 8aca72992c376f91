"""
The dev agent as a twistd service: sockets, threads and signals.

twistd builds this service before it forks, so everything that holds a
thread or a socket (the gRPC servers, the CA's timers, the signal handlers)
starts in L{DevAgentService.startService} and ends in C{stopService}.
"""

from __future__ import annotations

import signal
from typing import Any

import grpc
from twisted.application.service import IService, Service
from twisted.internet import defer, threads
from twisted.logger import Logger

from ghosttwist.devagent.agent import AgentConfig, DevAgent
from ghosttwist.devagent.options import DevAgentOptions
from ghosttwist.devagent.server import remove_socket_file, start_workload_server
from ghosttwist.devagent.state import SnapshotBoard

#: Seconds that open streams get to finish when the agent stops.
STOP_GRACE = 2.0


class DevAgentService(Service):
    """
    Serves the Workload API of every configured workload while running.

    SIGUSR1 issues every SVID again; SIGUSR2 starts a CA rotation.
    """

    log = Logger()

    def __init__(self, config: AgentConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self.config = config
        self.board = SnapshotBoard()
        self.agent = DevAgent(config, self.board, reactor)
        self._servers: dict[str, grpc.Server] = {}
        self._previous_handlers: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        self.agent.start()

        try:
            for path, spiffe_id in self.config.workloads.items():
                self._servers[path] = start_workload_server(self.board, path)
                self.log.info(
                    "serving {spiffe_id} on unix:{path}",
                    spiffe_id=spiffe_id,
                    path=path,
                )
        except (RuntimeError, OSError) as error:
            self.log.critical(
                "cannot listen: {error}; stopping the dev agent", error=error
            )
            self._reactor.callLater(0, self._reactor.stop)
            return

        self._install_signal_handlers()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._restore_signal_handlers()
        self.agent.stop()
        self.board.close()

        servers, self._servers = self._servers, {}
        waits = [
            threads.deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                server.stop(STOP_GRACE).wait,
                STOP_GRACE + 1,
            )
            for server in servers.values()
        ]
        done = defer.gatherResults(waits)
        done.addBoth(self._remove_sockets, list(servers))
        return done

    def _remove_sockets(self, result: object, paths: list[str]) -> object:
        for path in paths:
            remove_socket_file(path)
        return result

    def _install_signal_handlers(self) -> None:
        actions = {
            signal.SIGUSR1: self.agent.reissue_all,
            signal.SIGUSR2: self.agent.rotate_ca,
        }
        for number, action in actions.items():
            self._previous_handlers[number] = signal.signal(
                number, self._signal_handler(number, action)
            )

    def _signal_handler(self, number: int, action):
        def handle(signum: int, frame: object) -> None:
            self._reactor.callFromThread(self._on_signal, number, action)

        return handle

    def _on_signal(self, number: int, action) -> None:
        self.log.info("received {signal_name}", signal_name=signal.Signals(number).name)
        action()

    def _restore_signal_handlers(self) -> None:
        for number, previous in self._previous_handlers.items():
            signal.signal(number, previous)
        self._previous_handlers.clear()


def make_dev_agent_service(options: DevAgentOptions) -> IService:
    """
    Build the dev agent's service from checked options; twistd starts it.
    """
    assert options.config is not None
    return DevAgentService(options.config)
