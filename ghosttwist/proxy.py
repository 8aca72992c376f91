"""
Moving bytes: one accepted connection spliced to one dialed connection.

Each direction is a producer/consumer pair, so a slow reader pauses the
other side and memory stays bounded. An end of writing on one side becomes
an end of writing on the other (a FIN, or close_notify over TLS); after the
first direction ends the other has C{close_timeout} to finish. Every wait
is a C{callLater} that is cancelled on the way out, and every polite close
has a deadline that ends in C{abortConnection}.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ghosttwist.config import TunnelConfig
from ghosttwist import proxyproto
from ghosttwist.halfclose import HalfCloseTLSFactory
from ghosttwist.outbound import direct_dialer, target_endpoint
from ghosttwist.metrics import TunnelMetrics
from ghosttwist.sendnow import send_now
from ghosttwist.tls import ContextHolder, handshake_state

log = Logger()


class _Side(Protocol):
    """
    One end of a splice; every event is passed to the splice.
    """

    def __init__(self, splice: Splice, tls: bool) -> None:
        self.splice = splice
        self.tls = tls
        self.read_done = False
        self.lost = False
        self.bytes_in = 0
        self.abort_timer = None

    def connectionMade(self) -> None:
        self.splice.side_connected(self)

    def handshakeCompleted(self) -> None:
        self.splice.handshake_completed(self)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.splice.data_received(self, data)

    def readConnectionLost(self) -> None:
        self.read_done = True
        self.splice.read_ended(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        self.splice.side_lost(self, reason)


@implementer(IHalfCloseableProtocol)
class _PlainSide(_Side):
    """
    The side that carries plain bytes.

    It must not also declare L{IHandshakeListener}: Twisted's endpoint
    wrapper copies one interface only, and half-close would be lost.
    """


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class _TLSSide(_Side):
    """
    The side inside a TLS transport: told when the handshake (and so the
    peer's verification) has completed.
    """


class _DialFactory(ClientFactory):
    """
    Hands the dialed connection to its side. Dialed straight through the
    reactor, it is also the dial in progress: a failure goes to the
    splice, and L{cancel} stops the dial quietly, as cancelling an
    endpoint's Deferred does.
    """

    noisy = False
    connector = None
    cancelled = False

    def __init__(self, side: _Side) -> None:
        self.side = side

    def buildProtocol(self, addr) -> _Side:
        return self.side

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.cancelled:
            self.side.splice._dial_failed(reason)

    def cancel(self) -> None:
        self.cancelled = True
        if self.connector is None:
            return
        try:
            self.connector.stopConnecting()
        except NotConnectingError:
            pass


class ConnectionTracker:
    """
    The splices open right now, so a shutdown can wait for them to drain.
    """

    def __init__(self) -> None:
        self.open: set[Splice] = set()
        self._drained: list[Deferred] = []
        self.observers: list[Callable[[], None]] = []

    def add(self, splice: Splice) -> None:
        self.open.add(splice)
        self._notify()

    def remove(self, splice: Splice) -> None:
        self.open.discard(splice)
        self._notify()
        if not self.open:
            waiting, self._drained = self._drained, []
            for deferred in waiting:
                deferred.callback(None)

    def _notify(self) -> None:
        for observer in list(self.observers):
            observer()

    def drained(self) -> Deferred:
        """
        A Deferred that fires once no connection is open.
        """
        deferred = Deferred()
        if not self.open:
            deferred.callback(None)
        else:
            self._drained.append(deferred)
        return deferred

    def abort_all(self) -> None:
        """
        Cut every open connection: the drain deadline has passed.
        """
        count = len(self.open)
        log.warn(
            "shutdown timeout reached: cutting {count} open connection{s}",
            count=count,
            s="" if count == 1 else "s",
        )
        for splice in list(self.open):
            splice.abort("shutdown timeout reached")

    def forget_all(self) -> None:
        """
        Stop waiting for connections that an abort did not end: shutting
        down must finish even if a connection's bookkeeping went wrong.
        """
        if self.open:
            log.error(
                "{count} connection(s) did not end when cut; stopping anyway",
                count=len(self.open),
            )
        for splice in list(self.open):
            self.remove(splice)


class Splice:
    """
    One tunnelled connection: the accepted side, the dialed side, and the
    rules for joining and parting them.
    """

    def __init__(self, tunnel: TunnelFactory) -> None:
        self.tunnel = tunnel
        self.config: TunnelConfig = tunnel.config
        self.reactor = tunnel.reactor
        server = self.config.mode == "server"
        if server:
            self.inbound, self.outbound = _TLSSide(self, True), _PlainSide(self, False)
        else:
            self.inbound, self.outbound = _PlainSide(self, False), _TLSSide(self, True)
        self.spliced = False
        self.finished = False
        self.inbound_ready = False
        self.timed_out = False
        self.started = 0.0
        self.remote = "?"
        self._pending: list[bytes] = []
        self._dial: Deferred | _DialFactory | None = None
        self._setup_timer = None
        self._close_timer = None
        self._lifetime_timer = None

    # Setting up.

    def side_connected(self, side: _Side) -> None:
        _no_delay(side.transport)
        if side is self.inbound:
            self._accepted()
        elif not side.tls:
            self._join()

    def _accepted(self) -> None:
        self.started = time.monotonic()
        self.remote = _describe(self.inbound.transport.getPeer())
        self.tunnel.tracker.add(self)
        self.tunnel.metrics.accepted()

        if self.config.connect_timeout:
            self._setup_timer = self.reactor.callLater(
                self.config.connect_timeout, self._setup_timed_out
            )

        if not self.inbound.tls:
            self.inbound_ready = True
            self.tunnel.metrics.accept_succeeded()
            self.inbound.transport.pauseProducing()
            self._dial_target()

    def handshake_completed(self, side: _Side) -> None:
        state = handshake_state(side.transport)
        self.tunnel.metrics.handshake_done(
            time.monotonic() - self.started, resumed=bool(state and state.resumed)
        )
        if side is self.inbound:
            self.inbound_ready = True
            self.tunnel.metrics.accept_succeeded()
            self._dial_target()
        else:
            self._join()

    def _dial_target(self) -> None:
        if self.finished:
            return

        dial = _DialFactory(self.outbound)
        factory = dial
        if self.outbound.tls:
            factory = HalfCloseTLSFactory(
                self.tunnel.contexts, True, factory, self.reactor
            )

        connect = self.tunnel.dial_direct
        if connect is None:
            endpoint = target_endpoint(self.config, self.reactor)
            self._dial = endpoint.connect(factory)
            self._dial.addErrback(self._dial_failed)
            return

        # The setup timer, running since the accept, ends before a timeout
        # of the same length started now could: the dial needs none of
        # its own then.
        timeout = None if self._setup_timer else self.config.connect_timeout or 3600
        self._dial = dial
        dial.connector = connect(factory, timeout)

    def _dial_failed(self, failure) -> None:
        self._dial = None
        if self.finished or failure.check(CancelledError):
            return
        peer_id, _ = self._peer()
        _log_for(self.config, "conn-errs").warn(
            "connection from {remote} ({peer_id}): cannot reach {target}: {error}",
            remote=self.remote,
            peer_id=peer_id,
            target=str(self.config.target),
            error=failure.getErrorMessage(),
        )
        self._close(self.inbound)

    def _join(self) -> None:
        if self.finished or self.inbound.lost:
            self._close(self.outbound)
            return

        self._dial = None
        self._cancel_setup_timer()
        self.spliced = True
        self.tunnel.metrics.opened()
        self._log_open()

        inbound, outbound = self.inbound.transport, self.outbound.transport
        if self.config.proxy_protocol:
            outbound.write(self._proxy_header())
        if self.config.max_conn_lifetime:
            self._lifetime_timer = self.reactor.callLater(
                self.config.max_conn_lifetime, self._lifetime_reached
            )
        outbound.registerProducer(inbound, True)
        inbound.registerProducer(outbound, True)

        pending, self._pending = self._pending, []
        if pending:
            outbound.write(b"".join(pending))
        if self.inbound.read_done:
            self.read_ended(self.inbound)
        inbound.resumeProducing()

    def _setup_timed_out(self) -> None:
        self._setup_timer = None
        self.timed_out = True
        if self.inbound_ready:
            self.tunnel.metrics.conn_timed_out()
        else:
            self.tunnel.metrics.accept_timed_out()
        stage = "TLS handshake" if not self._dial else f"connecting to {self.config.target}"
        kind = "conn-errs" if self._dial else "handshake-errs"
        _log_for(self.config, kind).warn(
            "connection from {remote}: timed out during {stage} after {timeout}s",
            remote=self.remote,
            stage=stage,
            timeout=self.config.connect_timeout,
        )
        self.abort("connect timeout")

    def _proxy_header(self) -> bytes:
        state = handshake_state(self.inbound.transport)
        spiffe_id = state.peer_id if state is not None else None
        return proxyproto.header_for(
            self.config.proxy_protocol, self.inbound.transport, spiffe_id
        )

    def _lifetime_reached(self) -> None:
        self._lifetime_timer = None
        _log_for(self.config, "conns").info(
            "connection from {remote}: closing, --max-conn-lifetime {lifetime}s "
            "reached",
            remote=self.remote,
            lifetime=self.config.max_conn_lifetime,
        )
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_both()

    # Moving bytes.

    def data_received(self, side: _Side, data: bytes) -> None:
        if self.spliced:
            send_now(self._other(side).transport, data)
            return

        if side is self.inbound:
            self._pending.append(data)
            side.transport.pauseProducing()

    def read_ended(self, side: _Side) -> None:
        if not self.spliced:
            return

        other = self._other(side)
        if not other.lost:
            other.transport.unregisterProducer()
            other.transport.loseWriteConnection()

        if self.inbound.read_done and self.outbound.read_done:
            self._close_both()
        elif self._close_timer is None:
            self._close_timer = self.reactor.callLater(
                self.config.close_timeout, self._close_both
            )

    # Parting.

    def side_lost(self, side: _Side, reason) -> None:
        other = self._other(side)
        if side.abort_timer is not None and side.abort_timer.active():
            side.abort_timer.cancel()
        side.abort_timer = None

        if not self.spliced and side is self.inbound:
            self._refused(reason)
        elif not self.spliced and side is self.outbound and self.outbound.tls:
            self._server_refused(reason)

        if self._dial is not None:
            self._dial.cancel()
            self._dial = None

        if other.transport is not None and not other.lost:
            self._close(other)

        if self.inbound.lost and (self.outbound.lost or self.outbound.transport is None):
            self._finish()

    def _refused(self, reason) -> None:
        if not self.inbound_ready and not self.timed_out:
            self.tunnel.metrics.accept_failed()
        state = handshake_state(self.inbound.transport)
        if state is None:
            return
        if not state.refusal:
            _classify_handshake_failure(state, reason)
        if not state.refusal:
            return
        _log_for(self.config, "handshake-errs").warn(
            "refused connection from {remote}: {reason}: {detail} (peer {peer_id})",
            remote=self.remote,
            reason=state.refusal,
            detail=printable(state.detail),
            peer_id=printable(
                state.peer_name or state.peer_id or _peer_id_from_chain(state)
            ),
        )
        self.tunnel.metrics.refused(state.refusal)

    def _server_refused(self, reason) -> None:
        state = handshake_state(self.outbound.transport)
        detail = reason.getErrorMessage() if reason is not None else "closed"
        if state is not None and state.refusal:
            detail = f"{state.refusal}: {state.detail}"
            self.tunnel.metrics.refused(state.refusal)
        _log_for(self.config, "handshake-errs").warn(
            "connection from {remote}: refused server {target}: {detail}",
            remote=self.remote,
            target=str(self.config.target),
            detail=printable(detail),
        )

    def _close_both(self) -> None:
        self._close_timer = None
        for side in (self.inbound, self.outbound):
            if side.transport is not None and not side.lost:
                self._close(side)

    def _close(self, side: _Side) -> None:
        transport = side.transport
        if transport is None or side.lost:
            return

        transport.unregisterProducer()
        transport.loseConnection()
        if side.abort_timer is None and not side.lost:
            deadline = max(self.config.close_timeout, 1.0)
            side.abort_timer = self.reactor.callLater(deadline, self._abort_side, side)

    def _abort_side(self, side: _Side) -> None:
        side.abort_timer = None
        if not side.lost and side.transport is not None:
            side.transport.abortConnection()

    def abort(self, why: str) -> None:
        """
        Cut both sides now.
        """
        if self._dial is not None:
            self._dial.cancel()
            self._dial = None
        for side in (self.inbound, self.outbound):
            if side.transport is not None and not side.lost:
                side.transport.abortConnection()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_setup_timer()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        if self._lifetime_timer is not None and self._lifetime_timer.active():
            self._lifetime_timer.cancel()
        self._lifetime_timer = None
        if self.spliced:
            self.tunnel.metrics.closed(time.monotonic() - self.started)
            self._log_close()
        self.tunnel.tracker.remove(self)

    def _cancel_setup_timer(self) -> None:
        if self._setup_timer is not None and self._setup_timer.active():
            self._setup_timer.cancel()
        self._setup_timer = None

    def _other(self, side: _Side) -> _Side:
        return self.outbound if side is self.inbound else self.inbound

    # Log lines.

    def _peer(self) -> tuple[str, str]:
        tls_side = self.inbound if self.inbound.tls else self.outbound
        state = handshake_state(tls_side.transport)
        if state is None:
            return "not verified", ""
        name = state.peer_name or state.peer_id
        return printable(name or "no certificate"), printable(state.decision)

    def _log_open(self) -> None:
        peer_id, decision = self._peer()
        role = "client" if self.config.mode == "server" else "server"
        if not decision.startswith("allowed"):
            decision = f"allowed ({decision or 'no authentication'})"
        _log_for(self.config, "conns").info(
            "connection from {remote}: {role} {peer_id} {decision}, "
            "forwarding to {target}",
            remote=self.remote,
            role=role,
            peer_id=peer_id,
            decision=decision,
            target=str(self.config.target),
        )

    def _log_close(self) -> None:
        peer_id, _ = self._peer()
        _log_for(self.config, "conns").info(
            "closed connection from {remote} ({peer_id}): {sent} bytes in, "
            "{received} bytes out, {seconds:.3f}s",
            remote=self.remote,
            peer_id=peer_id,
            sent=self.inbound.bytes_in,
            received=self.outbound.bytes_in,
            seconds=time.monotonic() - self.started,
        )


_silent = Logger(observer=lambda event: None)


def _log_for(config: TunnelConfig, kind: str) -> Logger:
    """
    The logger for one kind of line, or a silent one if C{--quiet} asked
    to leave that kind out.
    """
    return _silent if kind in config.quiet else log


def _no_delay(transport) -> None:
    """
    Turn Nagle's algorithm off on a TCP transport (through a TLS wrapper):
    a tunnel forwards each chunk as it comes, and Nagle holding a small
    write back until the peer's delayed ACK costs tens of milliseconds per
    request-response turn. Other transports (unix sockets) are left alone.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:
        return
    try:
        set_no_delay(True)
    except OSError:
        pass


def printable(text: str) -> str:
    """
    C{text} with every control or non-printable character escaped, so that
    names taken from a peer's certificate cannot forge or split log lines.
    """
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def _describe(address) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    name = getattr(address, "name", None)
    return f"unix:{name.decode() if isinstance(name, bytes) else name or '@'}"


def _classify_handshake_failure(state, reason) -> None:
    """
    Name a handshake failure that verification did not record itself: a
    client that sent no certificate, or one whose TLS OpenSSL rejected.
    """
    from OpenSSL.SSL import Error

    if reason is None or not reason.check(Error):
        return

    text = str(reason.value)
    if "did not return a certificate" in text:
        state.refusal = "no-certificate"
        state.detail = "the client presented no certificate"
    else:
        state.refusal = "handshake-failed"
        state.detail = _ssl_error_text(reason.value)


def _ssl_error_text(error) -> str:
    try:
        return "; ".join(item[2] for item in error.args[0]) or str(error)
    except (IndexError, TypeError):
        return str(error)


def _peer_id_from_chain(state) -> str:
    leaf = state.chain.get(0)
    if leaf is None:
        return "unknown"
    try:
        from ghosttwist.auth.svid import spiffe_id_of

        spiffe_id = spiffe_id_of(leaf.to_cryptography())
    except Exception:
        spiffe_id = None
    return str(spiffe_id) if spiffe_id else "unknown ID"


class TunnelFactory(Factory):
    """
    Builds one L{Splice} per accepted connection and hands the reactor its
    accepted side.
    """

    noisy = False

    def __init__(self, config: TunnelConfig, contexts: ContextHolder, reactor) -> None:
        self.config = config
        self.contexts = contexts
        self.reactor = reactor
        self.tracker = ConnectionTracker()
        self.metrics = TunnelMetrics()
        self.dial_direct = direct_dialer(config, reactor)

    def buildProtocol(self, addr) -> _Side:
        return Splice(self).inbound
