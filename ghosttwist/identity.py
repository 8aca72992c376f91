"""
What the tunnel is and whom it trusts, as one immutable value, and the
interface every provider of such values offers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

import attrs
from cryptography import x509
from spiffe import SpiffeId
from zope.interface import Attribute, Interface


def _freeze_bundles(
    bundles: Mapping[str, tuple[x509.Certificate, ...]],
) -> Mapping[str, tuple[x509.Certificate, ...]]:
    return dict(sorted((name, tuple(cas)) for name, cas in bundles.items()))


@attrs.frozen
class Identity:
    """
    One snapshot of the tunnel's identity and trust.

    @ivar chain: the certificate chain to present, leaf first; empty when the
        tunnel presents no certificate.
    @ivar key: the private key matching C{chain[0]}, or L{None}.
    @ivar bundles: trust domain name to its CA certificates.
    @ivar spiffe_id: the SPIFFE ID in the leaf, when there is one.
    @ivar source: where it came from, C{"workload-api"} or C{"files"}.
    """

    chain: tuple[x509.Certificate, ...]
    key: object | None
    bundles: Mapping[str, tuple[x509.Certificate, ...]] = attrs.field(
        converter=_freeze_bundles, eq=False
    )
    spiffe_id: SpiffeId | None = None
    source: str = "workload-api"

    @property
    def leaf(self) -> x509.Certificate | None:
        """
        The certificate presented to peers, if any.
        """
        return self.chain[0] if self.chain else None

    @property
    def serial(self) -> str:
        """
        The leaf's serial number in hexadecimal, or an empty string.
        """
        return format(self.leaf.serial_number, "x") if self.leaf else ""

    @property
    def not_after(self) -> datetime | None:
        """
        When the leaf expires, if there is one.
        """
        return self.leaf.not_valid_after_utc if self.leaf else None

    def describe(self) -> dict[str, object]:
        """
        The fields a log line about this identity needs.
        """
        return {
            "spiffe_id": str(self.spiffe_id) if self.spiffe_id else "(none)",
            "serial": self.serial or "(none)",
            "not_after": self.not_after.isoformat() if self.not_after else "(none)",
            "trust_domains": ",".join(
                f"{name}({len(cas)} CA)" for name, cas in self.bundles.items()
            ),
        }


class IIdentitySource(Interface):
    """
    A provider of L{Identity} values that may change while the tunnel runs.

    Sources are started and stopped by the service that owns them, and
    deliver every update on the reactor thread.
    """

    current = Attribute("The latest Identity, or None before the first.")

    def start() -> None:
        """
        Begin fetching; open streams and threads here, never earlier.
        """

    def stop() -> None:
        """
        Stop fetching and release every thread and stream.
        """

    def subscribe(callback: Callable[[Identity], None]) -> None:
        """
        Call C{callback} on the reactor thread with each new L{Identity}.
        """


class IdentityFeed:
    """
    What every identity source shares: the latest L{Identity} and the
    callbacks that hear of each new one. Sources call L{_publish} on the
    reactor thread.
    """

    def __init__(self) -> None:
        self.current: Identity | None = None
        self._subscribers: list[Callable[[Identity], None]] = []

    def subscribe(self, callback: Callable[[Identity], None]) -> None:
        self._subscribers.append(callback)

    def _publish(self, identity: Identity) -> None:
        self.current = identity
        for callback in list(self._subscribers):
            callback(identity)
