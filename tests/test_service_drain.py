"""
Stopping the tunnel always finishes: the drain waits for open connections
up to --shutdown-timeout, cuts them, and does not wait forever for one
whose bookkeeping went wrong.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from ghosttwist.addresses import parse_address
from ghosttwist.config import TunnelConfig
from ghosttwist.service import TunnelService


class _StuckSplice:
    """
    A connection that ignores being aborted.
    """

    aborted = False

    def abort(self, why: str) -> None:
        self.aborted = True


def _service(reactor) -> TunnelService:
    config = TunnelConfig(
        mode="server",
        listen=parse_address("127.0.0.1:8443", flag="--listen"),
        target=parse_address("127.0.0.1:8080", flag="--target"),
        allow_all=True,
        shutdown_timeout=30.0,
    )
    return TunnelService(config, reactor)


def test_drain_finishes_after_the_timeout_even_if_a_connection_is_stuck():
    reactor = MemoryReactorClock()
    service = _service(reactor)
    stuck = _StuckSplice()
    service.factory.tracker.open.add(stuck)

    stopped = service._drain(None)
    reactor.advance(29)
    assert not stopped.called

    reactor.advance(1)
    assert stuck.aborted
    assert not stopped.called

    reactor.advance(2)
    assert stopped.called
    assert not service.factory.tracker.open
    assert not reactor.getDelayedCalls()


def test_drain_finishes_at_once_when_connections_end():
    reactor = MemoryReactorClock()
    service = _service(reactor)
    splice = _StuckSplice()
    service.factory.tracker.open.add(splice)

    stopped = service._drain(None)
    service.factory.tracker.remove(splice)

    assert stopped.called
    assert not reactor.getDelayedCalls()
