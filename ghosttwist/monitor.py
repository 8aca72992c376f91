"""
Everything that watches a tunnel from outside: the status port, metric
pushes to Graphite or an HTTP endpoint, and systemd notifications.

The tunnel service tells its L{Monitor} four things (started, identity
updated, listening, stopping) and the monitor keeps every observer in step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from io import BytesIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from ghosttwist.config import TunnelConfig
from ghosttwist.identity import Identity
from ghosttwist.metrics import TunnelMetrics
from ghosttwist.notify import SystemdNotifier
from ghosttwist.status import BackendCheck, StatusPort, TunnelHealth, status_site

log = Logger()


class _Send(Protocol):
    """
    Writes one payload and closes.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseConnection()


class MetricsPusher:
    """
    Every C{interval} seconds, sends the metrics to Graphite (plaintext
    protocol over TCP) and/or POSTs them as JSON to a URL.
    """

    def __init__(self, config: TunnelConfig, metrics: TunnelMetrics, reactor) -> None:
        self.config = config
        self.metrics = metrics
        self.reactor = reactor
        self._loop = LoopingCall(self.push)
        self._loop.clock = reactor
        self._failing: set[str] = set()

    @property
    def wanted(self) -> bool:
        return bool(self.config.metrics_graphite or self.config.metrics_url)

    def start(self) -> None:
        if self.wanted:
            self._loop.start(self.config.metrics_interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def push(self) -> Deferred:
        """
        Send the metrics once to every destination; never fails.
        """
        pushes = []
        if self.config.metrics_graphite:
            pushes.append(self._graphite())
        if self.config.metrics_url:
            pushes.append(self._post())
        for deferred in pushes:
            deferred.addErrback(lambda failure: None)
        return pushes[-1] if pushes else succeed(None)

    def _graphite(self) -> Deferred:
        address = self.config.metrics_graphite
        payload = self.metrics.graphite_lines(self.config.metrics_prefix)
        endpoint = address.client_endpoint(self.reactor, 10.0)
        sending = endpoint.connect(Factory.forProtocol(lambda: _Send(payload)))
        sending.addCallbacks(
            lambda _: self._succeeded("graphite"),
            lambda failure: self._failed("graphite", str(address), failure),
        )
        return sending

    def _post(self) -> Deferred:
        url = self.config.metrics_url
        body = FileBodyProducer(BytesIO(self.metrics.json_bytes(self.config.metrics_prefix)))
        agent = Agent(self.reactor, connectTimeout=10.0)
        headers = Headers({b"content-type": [b"application/json"]})
        posting = agent.request(b"POST", url.encode(), headers, body)

        def _answered(response) -> None:
            response.deliverBody(Protocol())
            if not 200 <= response.code < 300:
                raise ValueError(f"HTTP {response.code}")
            self._succeeded("url")

        posting.addCallback(_answered)
        posting.addErrback(lambda failure: self._failed("url", url, failure))
        return posting

    def _succeeded(self, kind: str) -> None:
        if kind in self._failing:
            self._failing.discard(kind)
            log.info("metrics push to {kind} works again", kind=kind)

    def _failed(self, kind: str, where: str, failure) -> None:
        if kind in self._failing:
            return
        self._failing.add(kind)
        log.warn(
            "cannot push metrics to {where}: {error}; retrying every {interval}s",
            where=where,
            error=failure.getErrorMessage(),
            interval=self.config.metrics_interval,
        )


class Monitor:
    """
    The status port, metric pushes and systemd notifications of one tunnel.
    """

    def __init__(
        self,
        config: TunnelConfig,
        metrics: TunnelMetrics,
        reactor,
        shutdown: Callable[[str], None],
        failed: Callable[[str], None],
        environ=None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.reactor = reactor
        self.health = TunnelHealth(config, metrics)
        self.pusher = MetricsPusher(config, metrics, reactor)
        self.notifier = SystemdNotifier(reactor, environ)
        self.status_port: StatusPort | None = None
        if config.status is not None:
            site = status_site(
                self.health,
                BackendCheck(config, reactor),
                shutdown if config.enable_shutdown else None,
                reactor,
            )
            self.status_port = StatusPort(config.status, site, reactor, failed)

    def start(self, source) -> None:
        """
        The tunnel started, with C{source} as its identity source.
        """
        self.health.source = source
        self.metrics.source = source
        self.notifier.start()
        self.notifier.status("waiting for an identity")
        if self.status_port is not None:
            self.status_port.start()
        self.pusher.start()

    def identity_updated(self, identity: Identity) -> None:
        """
        A new identity went into service.
        """
        self.metrics.identity_updated(identity)
        self.health.last_reload = time.time()
        if self.status_port is not None:
            try:
                self.status_port.identity_updated(identity)
            except Exception as error:
                log.error("status port cannot present the new identity: {error}",
                          error=error)
        self.notifier.status(_describe(identity))

    def listening(self, address: str) -> None:
        """
        The tunnel accepts connections at C{address}.
        """
        self.health.listen_address = address
        self.health.listening = True
        identity = self.metrics.identity
        self.notifier.ready(
            f"listening on {address}; " + (_describe(identity) if identity else "")
        )

    def stopping(self) -> None:
        """
        The tunnel is draining: report unhealthy, stop pushing.
        """
        self.health.stopping = True
        self.pusher.stop()
        self.notifier.stopping()

    def stop_after(self, draining) -> Deferred:
        """
        Once C{draining} (a Deferred, or L{None}) fires, close the status
        port and the notification socket; fires with C{draining}'s result.
        """
        if not isinstance(draining, Deferred):
            draining = succeed(draining)

        def _close(result):
            self.notifier.stop()
            if self.status_port is None:
                return result
            return self.status_port.stop().addBoth(lambda _: result)

        return draining.addBoth(_close)


def _describe(identity: Identity) -> str:
    details = identity.describe()
    return (
        f"identity {details['spiffe_id']} serial={details['serial']} "
        f"not_after={details['not_after']}"
    )
