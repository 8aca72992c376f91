"""
Trust bundles alone from the Workload API, for a client that presents no
certificate (C{client --disable-authentication}).

Such a client needs no X509-SVID, so it watches the FetchX509Bundles stream
instead and starts as soon as the first bundle arrives, even for a workload
the agent issues no SVID to. The C{spiffe} package offers this call only as
a one-shot fetch, so the stream is read here with the package's protos.
"""

from __future__ import annotations

import threading
import time

import grpc
from spiffe import TrustDomain, X509Bundle
from spiffe._proto import workload_pb2, workload_pb2_grpc
from twisted.logger import Logger
from zope.interface import implementer

from ghosttwist.addresses import WorkloadApiAddress
from ghosttwist.identity import IdentityFeed, IIdentitySource, Identity

log = Logger()

_HEADER = (("workload.spiffe.io", "true"),)
_MAX_BACKOFF = 2.0


def identity_from_bundles(response) -> Identity:
    """
    An L{Identity} that presents nothing and trusts the bundles in
    C{response}, an X509BundlesResponse.
    """
    bundles = {
        name: tuple(X509Bundle.parse_raw(TrustDomain(name), der).x509_authorities)
        for name, der in response.bundles.items()
    }
    return Identity(chain=(), key=None, bundles=bundles, source="workload-api")


@implementer(IIdentitySource)
class WorkloadApiBundleSource(IdentityFeed):
    """
    An identity source that follows the Workload API's bundle stream on a
    thread of its own, reconnecting with backoff when the agent goes away.
    """

    def __init__(self, address: WorkloadApiAddress, reactor) -> None:
        super().__init__()
        self.address = address
        self.updates = 0
        self.last_update: float | None = None
        self._reactor = reactor
        self._stopping = threading.Event()
        self._channel: grpc.Channel | None = None
        self._call = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._channel = grpc.insecure_channel(self.address.grpc_target)
        self._thread = threading.Thread(
            target=self._watch, name="workload-api-bundles", daemon=True
        )
        self._thread.start()
        log.info("Workload API: watching trust bundles at {address}",
                 address=str(self.address))

    def stop(self) -> None:
        self._stopping.set()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _watch(self) -> None:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                self._call = stub.FetchX509Bundles(
                    workload_pb2.X509BundlesRequest(), metadata=_HEADER
                )
                for response in self._call:
                    self._received(response)
                    backoff = 0.1
            except grpc.RpcError as error:
                if self._stopping.is_set():
                    return
                self._reactor.callFromThread(self._stream_failed, error)
            except ValueError:
                if self._stopping.is_set():
                    return
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _received(self, response) -> None:
        try:
            identity = identity_from_bundles(response)
        except Exception as error:
            self._reactor.callFromThread(
                log.error,
                "Workload API sent bundles that cannot be used ({error})",
                error=error,
            )
            return
        self._reactor.callFromThread(self._deliver, identity)

    def _stream_failed(self, error) -> None:
        log.debug(
            "Workload API bundle stream at {address}: {code}; retrying",
            address=str(self.address),
            code=error.code() if hasattr(error, "code") else error,
        )

    def _deliver(self, identity: Identity) -> None:
        if self._stopping.is_set():
            return
        self.updates += 1
        self.last_update = time.time()
        self._publish(identity)
