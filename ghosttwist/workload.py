"""
Identities from the SPIFFE Workload API, through the C{spiffe} package.

The package's client streams X509-SVID updates on a thread of its own and
reconnects by itself when the agent goes away. Each update is turned into an
L{Identity} on that thread and handed to the reactor with C{callFromThread};
nothing here touches reactor state from another thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from spiffe import WorkloadApiClient
from spiffe.workloadapi.workload_api_client import RetryPolicy
from twisted.logger import Logger
from zope.interface import implementer

from ghosttwist.addresses import WorkloadApiAddress
from ghosttwist.identity import IdentityFeed, IIdentitySource, Identity

log = Logger()

# Reconnect quickly after an agent restart, without hammering a dead socket.
_RETRY = RetryPolicy(
    max_retries=RetryPolicy.UNLIMITED_RETRIES,
    base_backoff_in_seconds=0.1,
    backoff_factor=2,
    max_backoff=2.0,
)


# gRPC channel states, as the status page names them.
_STATES = {
    "READY": "connected",
    "CONNECTING": "connecting",
    "TRANSIENT_FAILURE": "disconnected",
    "IDLE": "idle",
    "SHUTDOWN": "closed",
}


class _Client(WorkloadApiClient):
    """
    The C{spiffe} package's client, taught two things the tunnel needs: to
    start before the agent's socket exists (the stream retries until it
    appears) and to dial C{tcp://} addresses, which the specification allows.
    """

    def __init__(
        self,
        address: WorkloadApiAddress,
        watch: Callable[[object], None] | None = None,
    ) -> None:
        self._address = address
        self._watch = watch
        super().__init__(socket_path=address.uri)

    @staticmethod
    def _check_spiffe_socket_exists(spiffe_socket: str) -> None:
        return None

    def _get_spiffe_grpc_channel(self):
        import grpc
        from spiffe.workloadapi.grpc import header_manipulator_client_interceptor
        from spiffe.workloadapi.workload_api_client import (
            WORKLOAD_API_HEADER_KEY,
            WORKLOAD_API_HEADER_VALUE,
        )

        channel = grpc.insecure_channel(self._address.grpc_target)
        if self._watch is not None:
            channel.subscribe(self._watch, try_to_connect=False)
        interceptor = header_manipulator_client_interceptor.header_adder_interceptor(
            WORKLOAD_API_HEADER_KEY, WORKLOAD_API_HEADER_VALUE
        )
        return grpc.intercept_channel(channel, interceptor)


def identity_from_context(context) -> Identity:
    """
    Turn a C{spiffe} X509Context into an L{Identity}.
    """
    svid = context.default_svid
    bundles = {
        str(bundle.trust_domain): tuple(bundle.x509_authorities)
        for bundle in context.x509_bundle_set.bundles
    }
    return Identity(
        chain=tuple(svid.cert_chain),
        key=svid.private_key,
        bundles=bundles,
        spiffe_id=svid.spiffe_id,
        source="workload-api",
    )


@implementer(IIdentitySource)
class WorkloadApiSource(IdentityFeed):
    """
    An identity source fed by the Workload API's X509-SVID stream.

    @ivar updates: how many identities have arrived.
    @ivar last_update: C{time.time()} of the latest, or L{None}.
    @ivar connection_state: the gRPC channel to the agent: C{connecting},
        C{connected}, C{disconnected}, C{idle} or C{closed}.
    @ivar reconnects: how many times the connection came back after it
        had been up and was lost (an agent restart, a broken stream).
    """

    kind = "workload-api"

    def __init__(self, address: WorkloadApiAddress, reactor) -> None:
        super().__init__()
        self.address = address
        self.updates = 0
        self.last_update: float | None = None
        self._reactor = reactor
        self._client: _Client | None = None
        self._cancel = None
        self._stopped = False
        self.connection_state = "connecting"
        self.reconnects = 0
        self._was_connected = False
        self._lost = False
        self._generation = 0

    def start(self) -> None:
        self._stopped = False
        self._generation += 1
        self._client = _Client(self.address, self._watcher(self._generation))
        self._cancel = self._client.stream_x509_contexts(
            on_success=self._received_in_thread,
            on_error=self._failed_in_thread,
            retry_connect=True,
            retry_policy=_RETRY,
        )
        log.info("Workload API: watching {address}", address=str(self.address))

    def stop(self) -> None:
        self._stopped = True
        if self._cancel is not None:
            self._cancel.cancel()
            self._cancel = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _received_in_thread(self, context) -> None:
        try:
            identity = identity_from_context(context)
        except Exception as error:
            self._reactor.callFromThread(self._rejected, error)
            return
        self._reactor.callFromThread(self._deliver, identity)

    def _watcher(self, generation: int) -> Callable[[object], None]:
        def _in_thread(state) -> None:
            self._reactor.callFromThread(self._connectivity, generation, state.name)

        return _in_thread

    def _connectivity(self, generation: int, name: str) -> None:
        """
        Follow the current channel's state; a return to READY after a loss
        is a reconnect. Between a loss and that return the state is
        C{disconnected}, whatever idle or connecting phases gRPC goes
        through meanwhile.
        """
        if self._stopped or generation != self._generation:
            return
        self.connection_state = _STATES.get(name, name.lower())
        if name != "READY" and self._was_connected:
            self.connection_state = "disconnected"
        if name == "READY":
            if self._lost:
                self.reconnects += 1
                log.info(
                    "Workload API: reconnected to {address}", address=str(self.address)
                )
            self._was_connected, self._lost = True, False
        elif self._was_connected:
            self._lost = True

    def _failed_in_thread(self, error: Exception) -> None:
        self._reactor.callFromThread(self._failed, error)

    def _rejected(self, error: Exception) -> None:
        log.error(
            "Workload API sent an update that cannot be used ({error}); "
            "keeping the previous identity",
            error=error,
        )

    def _failed(self, error: Exception) -> None:
        if self._stopped:
            return
        self._lost = self._was_connected
        self.connection_state = "disconnected"
        log.error(
            "Workload API stream at {address} failed: {error}; reconnecting",
            address=str(self.address),
            error=error,
        )
        self._reactor.callLater(1.0, self._restart)

    def _restart(self) -> None:
        if self._stopped:
            return
        self.stop()
        self.start()

    def _deliver(self, identity: Identity) -> None:
        if self._stopped:
            return
        self.updates += 1
        self.last_update = time.time()
        self._publish(identity)
