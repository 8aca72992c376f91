"""
What the dev agent hands out, as immutable snapshots shared across threads.

The reactor owns the agent and publishes a new L{Snapshot} whenever an SVID
or a bundle changes; gRPC handler threads only read snapshots and wait on the
L{SnapshotBoard} for the next one. Nothing else crosses between the threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType

import attrs


def _frozen_mapping(value: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(value))


@attrs.frozen
class WorkloadSvid:
    """
    One workload's current X509-SVID, already in the Workload API's encoding.
    """

    spiffe_id: str
    chain_der: bytes = attrs.field(repr=False)
    key_der: bytes = attrs.field(repr=False)
    serial: int


@attrs.frozen
class Snapshot:
    """
    Everything the agent serves at one moment.

    C{svids} maps a workload's socket path to its SVID; C{bundles} maps each
    trust domain (our own and the federated ones) to its CAs as concatenated
    DER.
    """

    generation: int
    trust_domain: str
    svids: Mapping[str, WorkloadSvid] = attrs.field(converter=_frozen_mapping)
    bundles: Mapping[str, bytes] = attrs.field(converter=_frozen_mapping, repr=False)

    @property
    def own_bundle(self) -> bytes:
        return self.bundles[self.trust_domain]

    @property
    def federated_bundles(self) -> Mapping[str, bytes]:
        return {
            domain: der
            for domain, der in self.bundles.items()
            if domain != self.trust_domain
        }


class SnapshotBoard:
    """
    The latest L{Snapshot}, behind a lock, with a way to wait for a newer one.

    Readers never see a snapshot being built: they get a whole one or wait.
    L{close} wakes every waiter for good, which is how streams end when the
    agent stops.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._snapshot: Snapshot | None = None
        self._closed = False

    def publish(self, snapshot: Snapshot) -> None:
        """
        Make C{snapshot} the current one and wake every waiting stream.
        """
        with self._condition:
            self._snapshot = snapshot
            self._condition.notify_all()

    def current(self) -> Snapshot | None:
        with self._condition:
            return self._snapshot

    def wake(self) -> None:
        """
        Wake every waiter so it can look again (at its client, for one).
        """
        with self._condition:
            self._condition.notify_all()

    def close(self) -> None:
        """
        End every wait, now and later.
        """
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        with self._condition:
            return self._closed

    def wait_newer(
        self,
        generation: int,
        keep_waiting: Callable[[], bool],
        poll: float = 1.0,
    ) -> Snapshot | None:
        """
        Block until a snapshot newer than C{generation} is published.

        Return C{None} once the board is closed or C{keep_waiting()} turns
        false (a client that went away). C{poll} bounds each sleep, so a
        waiter whose wake-up was missed still looks again soon.
        """
        with self._condition:
            while True:
                if self._closed or not keep_waiting():
                    return None
                snapshot = self._snapshot
                if snapshot is not None and snapshot.generation > generation:
                    return snapshot
                self._condition.wait(poll)
