"""
The status port: C{/_status} (health as JSON, 200 or 503), C{/_metrics}
(JSON or Prometheus text) and, when enabled, C{POST /_shutdown}.

Laid out as ghostunnel's status port, plus what ghostunnel does not say:
the state of the tunnel's identity. Over HTTPS it presents the tunnel's own
current identity and asks no client certificate, so an orchestrator can
read which certificate is in service.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Literal
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ghosttwist._version import __version__
from ghosttwist.addresses import Address, InvalidAddress, parse_address
from ghosttwist.config import TunnelConfig
from ghosttwist.identity import Identity
from ghosttwist.listeners import inherited_sockets
from ghosttwist.metrics import TunnelMetrics, prometheus_registry, prometheus_text
from ghosttwist.tls import ContextHolder, build_context

log = Logger()

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


@attrs.frozen
class StatusAddress:
    """
    Where the status port listens, and whether it speaks HTTPS.

    @ivar address: a TCP or unix address, or L{None} for a systemd socket.
    @ivar systemd_name: the C{FileDescriptorName} of an inherited socket.
    """

    scheme: Literal["http", "https"]
    address: Address | None = None
    systemd_name: str = ""

    def __str__(self) -> str:
        if self.systemd_name:
            return f"systemd:{self.systemd_name}"
        if self.address.kind == "unix":
            return str(self.address)
        return f"{self.scheme}://{self.address}"

    def server_endpoint(self, reactor):
        """
        An endpoint listening where this address says.

        @raise InvalidAddress: when systemd passed no socket of that name.
        """
        if not self.systemd_name:
            return self.address.server_endpoint(reactor, backlog=128)

        named = inherited_sockets()
        if self.systemd_name not in named:
            raise InvalidAddress(
                f"--status {self}: systemd passed no socket named "
                f"{self.systemd_name!r} (names: {', '.join(named) or 'none'})"
            )
        descriptor = named[self.systemd_name]
        family = socket.socket(fileno=os.dup(descriptor))
        try:
            address_family = family.family
        finally:
            family.close()
        return AdoptedStreamServerEndpoint(reactor, descriptor, address_family)


def parse_status_address(text: str) -> StatusAddress:
    """
    Parse C{--status}: C{HOST:PORT} and C{https://HOST:PORT} serve HTTPS,
    C{http://HOST:PORT} plain HTTP, C{unix:PATH} plain HTTP on a unix
    socket, C{systemd:NAME} plain HTTP on a socket systemd passed in.

    @raise InvalidAddress: with a one-line message naming the flag.
    """
    if text.startswith("systemd:"):
        name = text[len("systemd:"):]
        if not name:
            raise InvalidAddress(f"--status {text!r}: the systemd socket name is empty")
        return StatusAddress("http", systemd_name=name)

    scheme: Literal["http", "https"] = "https"
    rest = text
    for prefix in ("http://", "https://"):
        if text.startswith(prefix):
            scheme = prefix[:-3]
            rest = text[len(prefix):].rstrip("/")

    if rest.startswith("unix:"):
        if rest is not text:
            raise InvalidAddress(
                f"--status {text!r}: a unix socket serves plain HTTP; "
                "write unix:PATH"
            )
        return StatusAddress("http", parse_address(rest, flag="--status"))

    address = parse_address(rest, flag="--status", allow_port_zero=True)
    return StatusAddress(scheme, address)


def check_http_url(text: str, flag: str) -> str:
    """
    Return C{text} if it is an http:// or https:// URL with a host.

    @raise InvalidAddress: naming C{flag} otherwise.
    """
    wrong = InvalidAddress(f"{flag} {text!r}: expected an http:// or https:// URL")
    if not (text.isascii() and text.isprintable()) or " " in text:
        raise wrong
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise wrong from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise wrong
    if port == 0:
        raise InvalidAddress(f"{flag} {text!r}: the port must be from 1 to 65535")
    return text


def rfc3339(timestamp: float) -> str:
    """
    A POSIX time as RFC 3339 in UTC, as ghostunnel writes times.
    """
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class BackendCheck:
    """
    Whether the target answers: a TCP connect to C{--target}, or an HTTP
    GET of C{--target-status} that must answer 2xx.
    """

    def __init__(self, config: TunnelConfig, reactor) -> None:
        self.config = config
        self.reactor = reactor
        self.timeout = min(config.connect_timeout or 10.0, 10.0)

    def check(self) -> Deferred:
        """
        Fire with L{None} when healthy, or with a one-line error.
        """
        if self.config.target_status:
            checking = self._get(self.config.target_status)
        else:
            checking = self._connect()
        checking.addTimeout(self.timeout, self.reactor)
        return checking.addErrback(_describe_failure)

    def _connect(self) -> Deferred:
        endpoint = self.config.target.client_endpoint(self.reactor, self.timeout)
        connecting = endpoint.connect(Factory.forProtocol(Protocol))

        def _connected(protocol) -> None:
            protocol.transport.abortConnection()

        return connecting.addCallback(_connected)

    def _get(self, url: str) -> Deferred:
        agent = Agent(self.reactor, connectTimeout=self.timeout)
        requesting = agent.request(b"GET", url.encode())

        def _answered(response) -> str | None:
            response.deliverBody(_Discard())
            if 200 <= response.code < 300:
                return None
            return f"{url} answered HTTP {response.code}"

        return requesting.addCallback(_answered)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


def _describe_failure(failure) -> str:
    if failure.check(DeferredTimeout, CancelledError):
        return "timed out"
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(reason.getErrorMessage() for reason in reasons)
    return failure.getErrorMessage() or failure.type.__name__


def identity_document(
    identity: Identity | None, source, last_update: float | None, now: float
) -> dict:
    """
    The C{identity} object of C{/_status}: what the tunnel presents, until
    when, whom it trusts, and how its identity source is doing.
    """
    document: dict = {"ok": False, "source": getattr(source, "kind", None)}
    if identity is not None:
        document["source"] = identity.source
    document["workload_api"] = _workload_api_document(source)

    if identity is None:
        document["error"] = "no identity has arrived yet"
        return document

    leaf = identity.leaf
    document.update(
        spiffe_id=str(identity.spiffe_id) if identity.spiffe_id else None,
        subject=leaf.subject.rfc4514_string() if leaf is not None else None,
        serial=identity.serial or None,
        not_before=_utc(leaf.not_valid_before_utc) if leaf is not None else None,
        not_after=_utc(leaf.not_valid_after_utc) if leaf is not None else None,
        seconds_to_expiry=None,
        trust_domains={name: len(cas) for name, cas in identity.bundles.items()},
        last_update=rfc3339(last_update) if last_update else None,
    )

    if leaf is None:
        document["ok"] = True
        return document

    remaining = leaf.not_valid_after_utc.timestamp() - now
    document["seconds_to_expiry"] = int(remaining)
    if remaining <= 0:
        document["error"] = f"the certificate expired at {document['not_after']}"
    elif leaf.not_valid_before_utc.timestamp() > now:
        document["error"] = f"the certificate is valid only from {document['not_before']}"
    else:
        document["ok"] = True
    return document


def _utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _workload_api_document(source) -> dict | None:
    state = getattr(source, "connection_state", None)
    if state is None:
        return None
    last = getattr(source, "last_update", None)
    return {
        "address": str(getattr(source, "address", "")),
        "state": state,
        "reconnects": getattr(source, "reconnects", 0),
        "updates": getattr(source, "updates", 0),
        "last_update": rfc3339(last) if last else None,
    }


@attrs.define
class TunnelHealth:
    """
    What the status page reports, kept up to date by the tunnel service.
    """

    config: TunnelConfig
    metrics: TunnelMetrics
    source: object = None
    listen_address: str = ""
    listening: bool = False
    stopping: bool = False
    last_reload: float | None = None
    worker: int | None = None

    def document(self, backend_error: str | None, now: float | None = None) -> dict:
        """
        The C{/_status} JSON document, given the backend check's outcome.
        """
        now = time.time() if now is None else now
        identity = identity_document(
            self.metrics.identity, self.source, self.last_reload, now
        )
        backend_ok = backend_error is None
        ok = self.listening and not self.stopping and backend_ok and identity["ok"]

        if self.stopping:
            message = "stopping"
        elif not self.listening:
            message = "initializing"
        else:
            message = "listening"

        return {
            "ok": ok,
            "status": "ok" if ok else "critical",
            "listen_address": self.listen_address or str(self.config.listen),
            "forward_address": str(self.config.target),
            "backend_ok": backend_ok,
            "backend_status": "ok" if backend_ok else "critical",
            "backend_error": backend_error or "",
            "time": rfc3339(now),
            "last_reload": rfc3339(self.last_reload) if self.last_reload else None,
            "hostname": socket.gethostname(),
            "message": message,
            "revision": __version__,
            "compiler": f"{platform.python_implementation()} {platform.python_version()}",
            "identity": identity,
            **({} if self.worker is None else {"worker": self.worker}),
        }


class StatusResource(Resource):
    """
    C{GET /_status}: 200 when listening with a valid identity and a
    reachable backend, 503 otherwise; the body says which.
    """

    isLeaf = True

    def __init__(self, health: TunnelHealth, backend: BackendCheck) -> None:
        super().__init__()
        self.health = health
        self.backend = backend

    def render_GET(self, request):
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda failure: gone.append(True))
        checking = self.backend.check()
        checking.addCallback(self._answer, request, gone)
        return NOT_DONE_YET

    def _answer(self, backend_error: str | None, request, gone: list[bool]) -> None:
        if gone:
            return
        document = self.health.document(backend_error)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if not document["ok"]:
            request.setResponseCode(503)
        request.write(json.dumps(document, indent=2).encode() + b"\n")
        request.finish()


class MetricsResource(Resource):
    """
    C{GET /_metrics} and C{/_metrics/json}: ghostunnel's JSON list;
    C{/_metrics/prometheus} or C{?format=prometheus}: Prometheus text.
    """

    isLeaf = True

    def __init__(self, metrics: TunnelMetrics, prefix: str) -> None:
        super().__init__()
        self.metrics = metrics
        self.prefix = prefix
        self.registry = prometheus_registry(metrics, prefix)

    def render_GET(self, request) -> bytes:
        wanted = request.args.get(b"format", [b""])[0]
        tail = b"/".join(request.postpath).strip(b"/")
        if tail not in (b"", b"json", b"prometheus"):
            request.setResponseCode(404)
            return b"unknown metrics format; use /_metrics/json or /_metrics/prometheus\n"

        if tail == b"prometheus" or wanted == b"prometheus":
            request.setHeader(b"content-type", PROMETHEUS_CONTENT_TYPE)
            return prometheus_text(self.registry)
        request.setHeader(b"content-type", b"application/json")
        return self.metrics.json_bytes(self.prefix)


class ShutdownResource(Resource):
    """
    C{POST /_shutdown}: the graceful stop a SIGTERM starts.
    """

    isLeaf = True

    def __init__(self, shutdown: Callable[[str], None], reactor) -> None:
        super().__init__()
        self.shutdown = shutdown
        self.reactor = reactor

    def render_POST(self, request) -> bytes:
        peer = request.getClientAddress()
        log.info("shutdown requested through the status port by {peer}", peer=peer)
        self.reactor.callLater(0, self.shutdown, "POST /_shutdown")
        request.setHeader(b"content-type", b"text/plain")
        return b"shutting down\n"


def status_site(
    health: TunnelHealth,
    backend: BackendCheck,
    shutdown: Callable[[str], None] | None,
    reactor,
) -> Site:
    """
    The web site of the status port.
    """
    root = Resource()
    root.putChild(b"_status", StatusResource(health, backend))
    root.putChild(b"_metrics", MetricsResource(health.metrics, health.config.metrics_prefix))
    if shutdown is not None:
        root.putChild(b"_shutdown", ShutdownResource(shutdown, reactor))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None
    return site


class StatusPort:
    """
    The status listener of one tunnel: plain HTTP at once, HTTPS once the
    first identity has arrived (there is nothing to present before).
    """

    def __init__(
        self,
        address: StatusAddress,
        site: Site,
        reactor,
        failed: Callable[[str], None],
    ) -> None:
        self.address = address
        self.site = site
        self.reactor = reactor
        self.failed = failed
        self.port = None
        self.contexts = ContextHolder(
            lambda identity: build_context(identity, server=True, policy=None)
        )
        self._listening: Deferred | None = None

    def start(self) -> None:
        if self.address.scheme == "http":
            self._listen(self.site)

    def identity_updated(self, identity: Identity) -> None:
        """
        Present C{identity} from now on (HTTPS only); listen on the first.
        """
        if self.address.scheme != "https":
            return
        self.contexts.update(identity)
        if self.port is None and self._listening is None:
            self._listen(TLSMemoryBIOFactory(self.contexts, False, self.site))

    def _listen(self, factory) -> None:
        try:
            endpoint = self.address.server_endpoint(self.reactor)
        except InvalidAddress as error:
            self.failed(str(error))
            return
        self._listening = endpoint.listen(factory)
        self._listening.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port) -> None:
        self._listening = None
        self.port = port
        host = port.getHost()
        where = str(self.address)
        if hasattr(host, "port") and self.address.address is not None:
            bracketed = f"[{host.host}]" if ":" in host.host else host.host
            where = f"{self.address.scheme}://{bracketed}:{host.port}"
        log.info("status port serving at {address}", address=where)

    def _listen_failed(self, failure) -> None:
        self._listening = None
        self.failed(f"cannot listen on --status {self.address}: "
                    f"{failure.getErrorMessage()}")

    def stop(self) -> Deferred:
        """
        Stop listening; fires once the port is closed.
        """
        port, self.port = self.port, None
        if self._listening is not None:
            self._listening.cancel()
        if port is None:
            return succeed(None)
        return port.stopListening() or succeed(None)
