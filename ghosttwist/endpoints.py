"""
SPIFFE mutual TLS as Twisted endpoints, for any Twisted program.

C{serverFromString(reactor, "spiffe:tcp\\:8443:allow=spiffe\\://d.test/web")}
listens with the Workload API's SVID and lets in only the listed IDs;
C{clientFromString(reactor, "spiffe:tcp\\:127.0.0.1\\:8443:verify=...")}
dials with it. The syntax is documented in docs/endpoints.md.

Every endpoint of a process that names the same Workload API address shares
one stream: one SVID, rotated for all of them at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from ghosttwist.addresses import WorkloadApiAddress, parse_workload_api_address
from ghosttwist.auth.policy import Authorizer, SpiffeIdPattern
from ghosttwist.auth.svid import BundleVerifier
from ghosttwist.durations import parse_duration
from ghosttwist.halfclose import HalfCloseTLSFactory
from ghosttwist.identity import Identity
from ghosttwist.tls import ContextHolder, PeerPolicy, build_context

DEFAULT_TIMEOUT = 600.0


class _SharedSource:
    """
    One Workload API stream for every endpoint that names its address;
    started by the first user, stopped when the last one lets go.
    """

    _by_address: dict[str, _SharedSource] = {}

    @classmethod
    def for_address(cls, address: WorkloadApiAddress, reactor) -> _SharedSource:
        shared = cls._by_address.get(address.uri)
        if shared is None:
            shared = cls._by_address[address.uri] = cls(address, reactor)
        return shared

    def __init__(self, address: WorkloadApiAddress, reactor) -> None:
        from ghosttwist.workload import WorkloadApiSource

        self.reactor = reactor
        self.source = WorkloadApiSource(address, reactor)
        self.source.subscribe(self._updated)
        self.users = 0
        self._watchers: list[Callable[[Identity], None]] = []
        self._waiting: list[Deferred] = []

    def watch(self, callback: Callable[[Identity], None]) -> None:
        self._watchers.append(callback)
        if self.source.current is not None:
            callback(self.source.current)

    def unwatch(self, callback: Callable[[Identity], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def acquire(self, timeout: float) -> Deferred:
        """
        Start the stream if needed; fire with the first identity.
        """
        self.users += 1
        if self.users == 1:
            self.source.start()
        if self.source.current is not None:
            return succeed(self.source.current)

        waiting = Deferred()
        self._waiting.append(waiting)
        if timeout:
            waiting.addTimeout(timeout, self.reactor, self._timed_out)
        return waiting

    def _timed_out(self, result, timeout) -> None:
        raise TimeoutError(
            string=f"no X509-SVID from the Workload API at "
            f"{self.source.address} within {timeout:g}s"
        )

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.source.stop()

    def _updated(self, identity: Identity) -> None:
        for callback in list(self._watchers):
            callback(identity)
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            if not deferred.called:
                deferred.callback(identity)


def _holder(shared: _SharedSource, server: bool, authorizer: Authorizer):
    def build(identity: Identity):
        policy = PeerPolicy(BundleVerifier(identity.bundles), authorizer)
        return build_context(identity, server=server, policy=policy)

    holder = ContextHolder(build)
    shared.watch(holder.update)
    return holder


@implementer(IListeningPort)
class _SpiffePort:
    """
    The wrapped endpoint's port; letting it go also lets go of the stream.
    """

    def __init__(self, port, release: Callable[[], None]) -> None:
        self._port = port
        self._release = release

    def startListening(self):
        return self._port.startListening()

    def stopListening(self):
        release, self._release = self._release, None
        if release is not None:
            release()
        return self._port.stopListening()

    def getHost(self):
        return self._port.getHost()


@implementer(IStreamServerEndpoint)
class SpiffeServerEndpoint:
    """
    Listen on C{wrapped} with mutual TLS: present the workload's SVID and let
    in only clients whose proven SPIFFE ID C{authorizer} allows.
    """

    def __init__(
        self,
        reactor,
        wrapped: IStreamServerEndpoint,
        authorizer: Authorizer,
        workload_api: WorkloadApiAddress,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._wrapped = wrapped
        self._shared = _SharedSource.for_address(workload_api, reactor)
        self._holder = _holder(self._shared, True, authorizer)
        self._timeout = timeout

    def listen(self, protocolFactory) -> Deferred:
        ready = self._shared.acquire(self._timeout)

        def _listen(identity):
            factory = HalfCloseTLSFactory(self._holder, False, protocolFactory)
            return self._wrapped.listen(factory)

        def _failed(failure):
            self._shared.release()
            return failure

        ready.addCallback(_listen)
        ready.addCallbacks(
            lambda port: _SpiffePort(port, self._shared.release), _failed
        )
        return ready


@implementer(IStreamClientEndpoint)
class SpiffeClientEndpoint:
    """
    Dial C{wrapped} with mutual TLS: present the workload's SVID and accept
    the server only if C{authorizer} allows the SPIFFE ID it proves.

    The Workload API stream stays open once a client endpoint has used it,
    for the life of the process, so later connections need not wait.
    """

    def __init__(
        self,
        reactor,
        wrapped: IStreamClientEndpoint,
        authorizer: Authorizer,
        workload_api: WorkloadApiAddress,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._wrapped = wrapped
        self._shared = _SharedSource.for_address(workload_api, reactor)
        self._holder = _holder(self._shared, False, authorizer)
        self._timeout = timeout
        self._acquired = False

    def connect(self, protocolFactory) -> Deferred:
        if self._acquired:
            ready = succeed(None)
        else:
            self._acquired = True
            ready = self._shared.acquire(self._timeout)

        def _connect(identity):
            factory = HalfCloseTLSFactory(self._holder, True, protocolFactory)
            connected = self._wrapped.connect(factory)
            return connected.addCallback(lambda tls: tls.wrappedProtocol)

        return ready.addCallback(_connect)


def _workload_api(kwargs: dict[str, str]) -> WorkloadApiAddress:
    text = kwargs.pop("workload_api", None) or os.environ.get("SPIFFE_ENDPOINT_SOCKET")
    if not text:
        raise ValueError(
            "spiffe endpoint: give workload_api=... or set SPIFFE_ENDPOINT_SOCKET"
        )
    return parse_workload_api_address(text)


def _authorizer(kwargs: dict[str, str], key: str, allow_any: bool) -> Authorizer:
    listed = kwargs.pop(key, None)
    if listed is not None and not listed.strip():
        raise ValueError(f"spiffe endpoint: {key}= is empty; name at least one ID")
    patterns = tuple(
        SpiffeIdPattern.parse(text.strip())
        for text in (listed or "").split(",")
        if text.strip()
    )
    allow_all = kwargs.pop("allow_all", "no").lower() in ("yes", "true", "1")
    if allow_all and patterns:
        raise ValueError(
            f"spiffe endpoint: allow_all=yes and {key}= exclude each other"
        )
    if not patterns and not allow_all and not allow_any:
        raise ValueError(f"spiffe endpoint: give {key}=SPIFFE_ID[,...] or allow_all=yes")
    return Authorizer(allow_all=allow_all or (allow_any and not patterns), patterns=patterns)


def _timeout(kwargs: dict[str, str]) -> float:
    text = kwargs.pop("timeout", None)
    return parse_duration(text) if text else DEFAULT_TIMEOUT


def _check_empty(args: tuple, kwargs: dict[str, str]) -> None:
    if len(args) != 1:
        raise ValueError(
            "spiffe endpoint: expected one wrapped endpoint, as spiffe:tcp\\:8443:..."
        )
    if kwargs:
        raise ValueError(f"spiffe endpoint: unknown parameter {sorted(kwargs)[0]!r}")


def _parse(reactor, args, kwargs, *, key: str, allow_any: bool, wrap, build):
    kwargs = dict(kwargs)
    workload_api = _workload_api(kwargs)
    authorizer = _authorizer(kwargs, key, allow_any=allow_any)
    timeout = _timeout(kwargs)
    _check_empty(args, kwargs)
    wrapped = wrap(reactor, args[0])
    return build(reactor, wrapped, authorizer, workload_api, timeout)


def parse_server(reactor, *args: str, **kwargs: str) -> SpiffeServerEndpoint:
    """
    Build a L{SpiffeServerEndpoint} from an endpoint string's parts.
    """
    return _parse(
        reactor, args, kwargs, key="allow", allow_any=False,
        wrap=serverFromString, build=SpiffeServerEndpoint,
    )


def parse_client(reactor, *args: str, **kwargs: str) -> SpiffeClientEndpoint:
    """
    Build a L{SpiffeClientEndpoint} from an endpoint string's parts.
    """
    return _parse(
        reactor, args, kwargs, key="verify", allow_any=True,
        wrap=clientFromString, build=SpiffeClientEndpoint,
    )
