"""
The tunnel as a Twisted service: identity source, TLS contexts, listener
and proxy, started and stopped together.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import time

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from ghosttwist.auth.policy import Authorizer, SpiffeIdPattern
from ghosttwist.auth.svid import BundleVerifier
from ghosttwist.config import TunnelConfig
from ghosttwist.durations import format_duration
from ghosttwist.halfclose import HalfCloseTLSFactory
from ghosttwist.identity import IIdentitySource, Identity
from ghosttwist.limits import ConnectionLimit
from ghosttwist.monitor import Monitor
from ghosttwist.listeners import server_endpoint
from ghosttwist.proxy import TunnelFactory
from ghosttwist.tls import CertPolicy, ContextHolder, PeerPolicy, build_context
from ghosttwist.files import FileIdentityError

log = Logger()


class StartupError(Exception):
    """
    The tunnel could not start; the message is the one line to show.
    """


def authorizer_for(config: TunnelConfig) -> Authorizer:
    """
    The authorization policy the flags describe.

    A client given no C{--verify-uri} accepts any server that proves a
    SPIFFE ID from the trust bundles: SPIFFE authentication stands in for
    the host name check a browser would make.
    """
    patterns = tuple(SpiffeIdPattern.parse(text) for text in config.allow_uris)
    allow_all = config.allow_all or (config.mode == "client" and not patterns)
    return Authorizer(allow_all=allow_all, patterns=patterns)


class TunnelService(Service):
    """
    One tunnel: listens once the first identity has arrived, rebuilds its
    TLS context on every update, and drains its connections when stopped.

    @ivar ready: fires with the listening port once the tunnel accepts
        connections, or fails with L{StartupError}.
    """

    def __init__(
        self,
        config: TunnelConfig,
        reactor=None,
        source: IIdentitySource | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.source = source
        self.authorizer = authorizer_for(config)
        self.contexts = ContextHolder(self._build_context)
        self.contexts.server_name = config.server_name
        self.policy = None
        self.factory = TunnelFactory(config, self.contexts, reactor)
        self.monitor = Monitor(
            config, self.factory.metrics, reactor, self.shutdown, self._monitor_failed
        )
        self.ready: Deferred = Deferred()
        self.port = None
        self._first_timer = None
        self._forget_timer = None
        self._expiry_timer = None
        self._bound = None

    def _build_context(self, identity: Identity):
        server = self.config.mode == "server"
        policy = None
        if not (server and self.config.disable_authentication):
            policy = self._peer_policy(identity)
        if self.config.disable_authentication and not server:
            identity = Identity(chain=(), key=None, bundles=identity.bundles)
        return build_context(
            identity,
            server=server,
            policy=policy,
            max_tls_version=self.config.max_tls_version,
            alpn=self.config.alpn,
        )

    def _peer_policy(self, identity: Identity) -> PeerPolicy | CertPolicy:
        """
        SPIFFE authentication with the Workload API; with files, OpenSSL's
        chain check against the CA bundle and the certificate name rules.
        """
        if self.config.files is None:
            return PeerPolicy(BundleVerifier(identity.bundles), self.authorizer)
        return CertPolicy(
            rules=self.config.names,
            allow_all=self.config.allow_all,
            server_name=self.config.server_name,
            rego=self.policy,
        )

    def _file_source(self) -> IIdentitySource:
        """
        Files and the Rego policy, reloaded together on SIGUSR1, SIGHUP and
        the C{--timed-reload} timer.
        """
        from ghosttwist.auth.rego import PolicyError, PolicyHolder
        from ghosttwist.files import FileSource

        hooks = []
        if self.config.policy is not None:
            try:
                self.policy = PolicyHolder(*self.config.policy)
            except PolicyError as error:
                raise FileIdentityError(str(error)) from None
            hooks.append(self.policy.reload)
        return FileSource(
            self.config.files, self.reactor, self.config.timed_reload, hooks
        )

    def privilegedStartService(self) -> None:
        """
        Bind the listening socket now, while twistd still holds the
        privileges a low port needs (C{--uid}/C{--gid} drop them after
        this). It accepts nothing until the first identity has arrived.
        """
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        """
        Make the listening port, not yet accepting; a failure fails
        C{ready}.
        """
        if self._bound is not None or self.ready.called:
            return
        factory = self.factory
        if self.config.mode == "server":
            factory = HalfCloseTLSFactory(self.contexts, False, factory, self.reactor)
        binding = self._server_endpoint().listen(factory)
        binding.addCallbacks(self._made_port, self._listen_failed)

    def _server_endpoint(self):
        """
        The endpoint C{--listen} names.
        """
        return server_endpoint(self.config.listen, self.reactor)

    def _made_port(self, port) -> None:
        port.stopReading()
        self._bound = port

    def startService(self) -> None:
        super().startService()
        if self.ready.called:
            return

        if self.source is None and self.config.files is not None:
            try:
                self.source = self._file_source()
            except FileIdentityError as error:
                self._fail(StartupError(str(error)))
                return
        if self.source is None:
            self.source = self._workload_api_source()

        self.source.subscribe(self._identity_updated)
        self.monitor.start(self.source)
        if self.config.workload_api_timeout:
            self._first_timer = self.reactor.callLater(
                self.config.workload_api_timeout, self._first_identity_timed_out
            )
        try:
            self.source.start()
        except FileIdentityError as error:
            self._fail(StartupError(str(error)))

    def _workload_api_source(self) -> IIdentitySource:
        """
        A client that presents no certificate needs only trust bundles, so it
        follows the bundle stream and need not wait for an X509-SVID.
        """
        if self.config.mode == "client" and self.config.disable_authentication:
            from ghosttwist.workload_bundles import WorkloadApiBundleSource

            return WorkloadApiBundleSource(self.config.workload_api, self.reactor)

        from ghosttwist.workload import WorkloadApiSource

        return WorkloadApiSource(self.config.workload_api, self.reactor)

    def shutdown(self, why: str) -> None:
        """
        Stop the tunnel gracefully, as SIGTERM does: drain, then exit 0.
        """
        _stop_gracefully(self.reactor, why)

    def _monitor_failed(self, message: str) -> None:
        if self.ready.called:
            log.error("ghosttwist: {message}", message=message)
        self._fail(StartupError(message))

    def _first_identity_timed_out(self) -> None:
        self._first_timer = None
        self._fail(
            StartupError(
                f"no X509-SVID from the Workload API at {self.config.workload_api} "
                f"after {format_duration(self.config.workload_api_timeout)}; is the "
                "agent running and does it know this workload?"
            )
        )

    def _identity_updated(self, identity: Identity) -> None:
        try:
            self.contexts.update(identity)
        except Exception as error:
            log.error(
                "identity update for {spiffe_id} cannot be used ({error}); "
                "keeping the previous one",
                error=error,
                **identity.describe(),
            )
            return

        log.info(
            "identity updated: {spiffe_id} serial={serial} not_after={not_after} "
            "bundles={trust_domains}",
            **identity.describe(),
        )
        self.monitor.identity_updated(identity)
        self._watch_expiry(identity)

        if self._first_timer is not None:
            self._first_timer.cancel()
            self._first_timer = None
        if self.port is None and self.running:
            self._listen()

    def _watch_expiry(self, identity: Identity) -> None:
        """
        Log, when it happens, that the certificate in service expired with
        no newer one to replace it: from then on peers refuse handshakes.
        """
        self._cancel_expiry_timer()
        if identity.not_after is None:
            return
        delay = max(identity.not_after.timestamp() - time.time(), 0.0)
        self._expiry_timer = self.reactor.callLater(delay, self._expired, identity)

    def _expired(self, identity: Identity) -> None:
        self._expiry_timer = None
        log.error(
            "the certificate in service ({spiffe_id} serial={serial}) expired at "
            "{not_after} and no newer one has arrived; peers will refuse new "
            "handshakes until the identity source sends one",
            **identity.describe(),
        )

    def _cancel_expiry_timer(self) -> None:
        if self._expiry_timer is not None and self._expiry_timer.active():
            self._expiry_timer.cancel()
        self._expiry_timer = None

    def _listen(self) -> None:
        self._bind()
        port, self._bound = self._bound, None
        if port is not None:
            self._listened(port)

    def _listened(self, port) -> None:
        self.port = port
        if self.ready.called:
            # Start-up already failed elsewhere (the status port, say):
            # never accept a connection on the way out.
            return
        log.info(
            "{mode} listening on {address}, forwarding to {target}",
            mode=self.config.mode,
            address=_address_of(port, self.config),
            target=str(self.config.target),
        )
        if not self.running:
            port.stopListening()
            return
        if self.config.max_concurrent_conns:
            ConnectionLimit(self.config.max_concurrent_conns, self.factory.tracker).attach(
                port
            )
        self.monitor.listening(_address_of(port, self.config))
        port.startReading()
        self.ready.callback(port)

    def _listen_failed(self, failure) -> None:
        self._fail(
            StartupError(
                f"cannot listen on {self.config.listen}: {_listen_error(failure)}"
            )
        )

    def _fail(self, error: StartupError) -> None:
        if not self.ready.called:
            self.ready.errback(error)

    def stopService(self):
        super().stopService()
        self.monitor.stopping()
        self._cancel_expiry_timer()

        if self._first_timer is not None:
            self._first_timer.cancel()
            self._first_timer = None
        if self.source is not None:
            self.source.stop()

        port, self.port = self.port or self._bound, None
        self._bound = None
        stopped = port.stopListening() if port is not None else None
        if not self.ready.called:
            self.ready.errback(StartupError("stopped before it started"))
            self.ready.addErrback(lambda failure: None)

        return self.monitor.stop_after(self._drain(stopped))

    def _drain(self, stopped):
        tracker = self.factory.tracker
        if not tracker.open:
            return stopped

        timeout = self.config.shutdown_timeout
        log.info(
            "shutting down: waiting up to {timeout} for {count} open "
            "connection{s}",
            timeout=format_duration(timeout),
            count=len(tracker.open),
            s="" if len(tracker.open) == 1 else "s",
        )
        drained = tracker.drained()
        timer = self.reactor.callLater(timeout, self._cut, tracker)

        def _done(result):
            for pending in (timer, self._forget_timer):
                if pending is not None and pending.active():
                    pending.cancel()
            return result

        drained.addBoth(_done)
        if stopped is None:
            return drained
        # Wait for the port too: a unix listener removes its socket file
        # when it has stopped, and the reactor must not end before that.
        return DeferredList([drained, stopped], consumeErrors=True)


    def _cut(self, tracker) -> None:
        """
        The drain deadline has passed: abort what is open, and give the
        aborts a moment before no longer waiting for them.
        """
        tracker.abort_all()
        self._forget_timer = self.reactor.callLater(_ABORT_GRACE, tracker.forget_all)


# How long aborted connections get to report that they have gone.
_ABORT_GRACE = 2.0


def _listen_error(failure) -> str:
    """
    The operating system's reason a listen failed, without Twisted's
    restatement of the address.
    """
    socket_error = getattr(failure.value, "socketError", None)
    if socket_error is not None:
        return getattr(socket_error, "strerror", None) or str(socket_error)
    return failure.getErrorMessage()


def _address_of(port, config: TunnelConfig) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        if ":" in host.host:
            return f"[{host.host}]:{host.port}"
        return f"{host.host}:{host.port}"
    return str(config.listen)


def make_tunnel_service_for_twistd(options) -> TunnelService:
    """
    The service twistd runs: a failure to start is logged as one line and
    ends the process with exit status 1.
    """
    from twisted.internet import reactor

    if options.config.workers > 1:
        from ghosttwist.workers import WorkerSupervisor

        return WorkerSupervisor(options.config, reactor)
    return TwistdTunnelService(options.config, reactor)


class TwistdTunnelService(TunnelService):
    """
    The tunnel as twistd runs it, from the command line or from a .tap
    file: SIGTERM and SIGINT drain and exit 0, and a failure to start is
    one line and exit status 1.

    Only the configuration is pickled into a .tap; threads, sockets,
    contexts and the Workload API stream are built afresh on load.
    """

    def startService(self) -> None:
        self.ready.addCallbacks(
            self._freeze_soon, _exit_on_startup_failure, errbackArgs=(self.reactor,)
        )
        self.reactor.callWhenRunning(_install_graceful_signals, self.reactor)
        super().startService()

    def _freeze_soon(self, port: object) -> object:
        # On a turn of its own, not inside the start-up call that fired
        # ready (a file source installs its signal handlers in it).
        self.reactor.callLater(0, _freeze_startup_objects, None)
        return port

    def __getstate__(self) -> dict:
        return {"config": self.config, "name": self.name, "parent": self.parent}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])
        self.name = state["name"]
        self.parent = state["parent"]


def _freeze_startup_objects(result: object) -> object:
    """
    Once the tunnel runs, move every object alive so far (modules, the
    gRPC channel, contexts: hundreds of thousands) out of the garbage
    collector's sight. Each connection leaves a few reference cycles
    behind, and without this every full collection walked all of them
    again: tens of milliseconds in which no byte moved. Only for twistd,
    which owns the process; an embedding application decides for itself.
    """
    gc.collect()
    gc.freeze()
    return result


def _install_graceful_signals(reactor) -> None:
    """
    Make SIGTERM and SIGINT a graceful stop that exits 0 once connections
    have drained, as ghostunnel does; twistd's own handlers would end the
    process by re-raising the signal after the drain.
    """

    def _handler(number, frame) -> None:
        reactor.callFromThread(_stop_gracefully, reactor, signal.Signals(number).name)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, _handler)


def _stop_gracefully(reactor, name: str) -> None:
    log.info("received {signal}: stopping gracefully", signal=name)
    if reactor.running:
        reactor.stop()


def _exit_on_startup_failure(failure, reactor) -> None:
    if not failure.check(StartupError):
        return failure

    message = failure.getErrorMessage()
    if message == "stopped before it started":
        return None

    log.critical("ghosttwist: {message}", message=message)
    atexit.register(_exit_now, 1)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
    return None


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
