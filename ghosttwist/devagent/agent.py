"""
The dev agent's schedule: when SVIDs are issued and how its CA rotates.

L{DevAgent} lives on the reactor. It keeps the CAs and the current SVIDs,
runs every timer through an C{IReactorTime}, and publishes an immutable
L{Snapshot} to a L{SnapshotBoard} after every change; the gRPC side only
ever reads those snapshots.

CA rotation follows SPIRE's order, so that no peer ever meets an SVID signed
by a CA it does not trust yet:

 1. at half the CA's lifetime (or on request) a new CA is minted and added
    to the bundle, and the bundle is published;
 2. after L{DevAgent.activation_delay} the new CA starts signing and every
    SVID is issued again;
 3. the old CA stays in the bundle until the last SVID it signed expires.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import attrs
from cryptography import x509
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ghosttwist.devagent.ca import (
    CertificateAuthority,
    X509Svid,
    certificates_der,
    mint_ca,
    mint_svid,
)
from ghosttwist.devagent.state import Snapshot, SnapshotBoard, WorkloadSvid

#: The shortest wait before an SVID is issued again, however close its CA is
#: to expiring.
MINIMUM_REFRESH = 1.0


@attrs.frozen
class AgentConfig:
    """
    What the dev agent serves, as checked from the command line.

    C{workloads} maps each socket path to the SPIFFE ID served on it;
    C{federated} maps a foreign trust domain to its CA certificates.
    """

    trust_domain: str
    workloads: Mapping[str, str]
    svid_ttl: float = 3600.0
    ca_ttl: float = 86400.0
    federated: Mapping[str, tuple[x509.Certificate, ...]] = attrs.field(factory=dict)
    ca: CertificateAuthority | None = None


class DevAgent:
    """
    The reactor-owned state of the dev agent: CAs, SVIDs and their timers.

    Call its methods on the reactor thread only.
    """

    log = Logger()

    #: Seconds between a new CA entering the bundle and its first signature.
    activation_delay = 1.0

    def __init__(
        self, config: AgentConfig, board: SnapshotBoard, clock: IReactorTime
    ) -> None:
        self.config = config
        self._board = board
        self._clock = clock
        self._generation = 0

        self._active: CertificateAuthority | None = None
        self._pending: CertificateAuthority | None = None
        self._bundle: list[CertificateAuthority] = []
        self._last_signed: dict[int, datetime.datetime] = {}
        self._svids: dict[str, X509Svid] = {}

        self._svid_timers: dict[str, IDelayedCall] = {}
        self._drop_timers: dict[int, IDelayedCall] = {}
        self._rotation_timer: IDelayedCall | None = None
        self._activation_timer: IDelayedCall | None = None

    @property
    def active_ca(self) -> CertificateAuthority | None:
        """
        The CA that signs new SVIDs now.
        """
        return self._active

    @property
    def bundle(self) -> tuple[CertificateAuthority, ...]:
        """
        Every CA of our trust domain that peers should trust now.
        """
        return tuple(self._bundle)

    def svid_for(self, socket_path: str) -> X509Svid:
        """
        The SVID currently served on C{socket_path}.
        """
        return self._svids[socket_path]

    def start(self) -> None:
        """
        Take the first CA, issue every SVID, publish, and start the timers.
        """
        if self.config.ca is not None:
            ca = self.config.ca
            self.log.info(
                "signing with the CA given by --ca serial={serial:x} "
                "not_after={not_after}; it will not be rotated",
                serial=ca.serial,
                not_after=ca.not_after.isoformat(),
            )
        else:
            ca = mint_ca(self.config.trust_domain, self._ca_ttl(), self._now())
            self._log_ca("minted CA", ca)

        self._active = ca
        self._bundle.append(ca)
        self._schedule_rotation()
        self._issue_all()

    def stop(self) -> None:
        """
        Cancel every timer; the agent does nothing more after this.
        """
        timers = [self._rotation_timer, self._activation_timer]
        timers += list(self._svid_timers.values())
        timers += list(self._drop_timers.values())
        for timer in timers:
            if timer is not None and timer.active():
                timer.cancel()

        self._svid_timers.clear()
        self._drop_timers.clear()
        self._rotation_timer = self._activation_timer = None

    def reissue_all(self) -> None:
        """
        Issue every workload a new SVID now (SIGUSR1).
        """
        self.log.info("issuing every SVID again on request")
        self._issue_all()

    def rotate_ca(self) -> None:
        """
        Start a CA rotation now (SIGUSR2, or half the CA's lifetime).
        """
        if self.config.ca is not None:
            # twisted.logger spells it warn, not warning.
            self.log.warn("not rotating: the CA was given by --ca")  # noqa: G010
            return
        if self._pending is not None:
            self.log.info("a CA rotation is already under way; not starting another")
            return

        if self._rotation_timer is not None and self._rotation_timer.active():
            self._rotation_timer.cancel()
        self._rotation_timer = None

        new_ca = mint_ca(self.config.trust_domain, self._ca_ttl(), self._now())
        self._pending = new_ca
        self._bundle.append(new_ca)
        self._log_ca(
            "prepared CA; in the bundle now, signing in {delay}s",
            new_ca,
            delay=self.activation_delay,
        )
        self._publish()

        self._activation_timer = self._clock.callLater(
            self.activation_delay, self._activate
        )

    def _activate(self) -> None:
        self._activation_timer = None
        old, new = self._active, self._pending
        assert old is not None and new is not None
        self._active, self._pending = new, None
        self._log_ca("activated CA", new)

        self._schedule_rotation()
        self._issue_all()
        self._retire(old)

    def _retire(self, ca: CertificateAuthority) -> None:
        last = self._last_signed.pop(ca.serial, None)
        delay = 0.0
        if last is not None:
            delay = max(0.0, (last - self._now()).total_seconds())
        self._log_ca(
            "retired CA; it leaves the bundle in {delay}s, when its last SVID expires",
            ca,
            delay=delay,
        )
        self._drop_timers[ca.serial] = self._clock.callLater(delay, self._drop, ca)

    def _drop(self, ca: CertificateAuthority) -> None:
        del self._drop_timers[ca.serial]
        self._bundle.remove(ca)
        self._log_ca("dropped CA from the bundle", ca)
        self._publish()

    def _issue_all(self) -> None:
        for path in self.config.workloads:
            self._issue(path)
        self._publish()

    def _issue_and_publish(self, path: str) -> None:
        self._issue(path)
        self._publish()

    def _issue(self, path: str) -> None:
        ca = self._active
        assert ca is not None
        now = self._now()
        timer = self._svid_timers.pop(path, None)
        if timer is not None and timer.active():
            timer.cancel()

        if ca.not_after <= now:
            self.log.error(
                "cannot issue an SVID for {spiffe_id}: the CA expired at "
                "{not_after}; restart the dev agent with a valid --ca",
                spiffe_id=self.config.workloads[path],
                not_after=ca.not_after.isoformat(),
            )
            return

        svid = mint_svid(ca, self.config.workloads[path], self._svid_ttl(), now)
        self._svids[path] = svid
        previous = self._last_signed.get(ca.serial)
        if previous is None or svid.not_after > previous:
            self._last_signed[ca.serial] = svid.not_after
        self.log.info(
            "issued X509-SVID {spiffe_id} serial={serial:x} not_after={not_after}",
            spiffe_id=svid.spiffe_id,
            serial=svid.serial,
            not_after=svid.not_after.isoformat(),
        )

        lifetime = (svid.not_after - now).total_seconds()
        refresh = max(MINIMUM_REFRESH, lifetime / 2)
        self._svid_timers[path] = self._clock.callLater(
            refresh, self._issue_and_publish, path
        )

    def _schedule_rotation(self) -> None:
        if self.config.ca is not None:
            return
        self._rotation_timer = self._clock.callLater(
            self.config.ca_ttl / 2, self.rotate_ca
        )

    def _publish(self) -> None:
        self._generation += 1
        bundles = {
            domain: certificates_der(certificates)
            for domain, certificates in self.config.federated.items()
        }
        bundles[self.config.trust_domain] = certificates_der(
            tuple(ca.certificate for ca in self._bundle)
        )
        svids = {
            path: WorkloadSvid(
                svid.spiffe_id, svid.chain_der(), svid.key_der(), svid.serial
            )
            for path, svid in self._svids.items()
        }
        self._board.publish(
            Snapshot(self._generation, self.config.trust_domain, svids, bundles)
        )

    def _log_ca(self, what: str, ca: CertificateAuthority, **fields: object) -> None:
        self.log.info(
            what + " serial={serial:x} not_after={not_after}",
            serial=ca.serial,
            not_after=ca.not_after.isoformat(),
            **fields,
        )

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), tz=datetime.UTC)

    def _svid_ttl(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.config.svid_ttl)

    def _ca_ttl(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.config.ca_ttl)
