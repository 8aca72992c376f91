"""
What the tunnel counts, and the three ways it tells: a list of named
numbers (JSON, Graphite, pushes), Prometheus text, and the values a status
page shows.

The names and meanings of the connection metrics are ghostunnel's
(C{accept.total}, C{conn.open}, C{conn.handshake} and the rest), so that
C{--metrics-prefix ghostunnel} keeps existing dashboards working; timers
are reported in nanoseconds, as ghostunnel's are. The identity metrics are
ghosttwist's own.

Every tunnel owns one L{TunnelMetrics} and one Prometheus
C{CollectorRegistry}: the process-wide default registry is never touched,
so two tunnels in one process never mix their numbers.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from cryptography.hazmat.primitives import hashes
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.samples import Sample

from ghosttwist.identity import Identity

#: The refusal reasons every tunnel reports from the start, at zero, so
#: that alerts can be written before the first refusal happens.
KNOWN_REFUSALS = (
    "unauthorized",
    "untrusted-chain",
    "no-certificate",
    "handshake-timeout",
)

#: Percentiles of a timer, as ghostunnel names them.
PERCENTILES = (0.5, 0.75, 0.95, 0.99, 0.999)

_NANOSECONDS = 1e9
_TICK = 5.0


def _percentile_name(fraction: float) -> str:
    return f"{fraction * 100:g}-percentile"


class _Rate:
    """
    An exponentially weighted moving average of events per second over
    C{minutes}, ticking every five seconds, as Unix load averages do.
    """

    def __init__(self, minutes: float) -> None:
        self.alpha = 1 - math.exp(-_TICK / 60.0 / minutes)
        self.rate = 0.0
        self.started = False

    def tick(self, events: int) -> None:
        instant = events / _TICK
        if not self.started:
            self.rate, self.started = instant, True
        else:
            self.rate += self.alpha * (instant - self.rate)


class Timer:
    """
    Durations of one kind of event: how many, their extremes, mean, spread
    and percentiles over the latest C{size} samples, and event rates.

    Durations go in as seconds and come out as nanoseconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, size=1028):
        self._clock = clock
        self._samples: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total = 0.0
        self._squares = 0.0
        self.min = 0.0
        self.max = 0.0
        self._born = clock()
        self._last_tick = self._born
        self._uncounted = 0
        self._rates = {1: _Rate(1), 5: _Rate(5), 15: _Rate(15)}

    def update(self, seconds: float) -> None:
        """
        Record one event that took C{seconds}.
        """
        self._catch_up()
        value = max(seconds, 0.0) * _NANOSECONDS
        if not self.count or value < self.min:
            self.min = value
        if not self.count or value > self.max:
            self.max = value
        self.count += 1
        self.total += value
        self._squares += value * value
        self._samples.append(value)
        self._uncounted += 1

    def _catch_up(self) -> None:
        now = self._clock()
        while now - self._last_tick >= _TICK:
            self._last_tick += _TICK
            for rate in self._rates.values():
                rate.tick(self._uncounted)
            self._uncounted = 0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def variance(self) -> float:
        if self.count < 2:
            return 0.0
        mean = self.mean
        return max(self._squares / self.count - mean * mean, 0.0)

    def percentile(self, fraction: float) -> float:
        """
        The value below which C{fraction} of the recent samples fall.
        """
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        position = fraction * (len(ordered) + 1)
        if position < 1:
            return ordered[0]
        if position >= len(ordered):
            return ordered[-1]
        low = ordered[int(position) - 1]
        high = ordered[int(position)]
        return low + (position - int(position)) * (high - low)

    def rate(self, minutes: int) -> float:
        """
        Events per second, averaged over the last C{minutes} (1, 5 or 15).
        """
        self._catch_up()
        return self._rates[minutes].rate

    @property
    def mean_rate(self) -> float:
        elapsed = self._clock() - self._born
        return self.count / elapsed if elapsed > 0 else 0.0

    def summary(self) -> list[tuple[str, float]]:
        """
        The sub-metrics ghostunnel reports for a timer, by suffix.
        """
        values = [
            ("count", self.count),
            ("min", self.min),
            ("max", self.max),
            ("mean", self.mean),
        ]
        values += [(_percentile_name(p), self.percentile(p)) for p in PERCENTILES]
        return values


class TunnelMetrics:
    """
    The counters of one tunnel, fed by the proxy at each step of a
    connection and by the service at each identity update.

    @ivar refusals: connections refused before reaching the target, by the
        reason token the verifier or the proxy gave.
    @ivar source: the identity source, read for its Workload API state.
    @ivar worker: under C{--workers}, this process's worker index: a
        C{worker} label in Prometheus and JSON, a C{workerN} name part in
        Graphite. L{None} otherwise.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.accept_total = 0
        self.accept_success = 0
        self.accept_error = 0
        self.accept_timeout = 0
        self.conn_timeout = 0
        self.conn_open = 0
        self.resumed = 0
        self.handshake = Timer(clock)
        self.lifetime = Timer(clock)
        self.refusals: dict[str, int] = dict.fromkeys(KNOWN_REFUSALS, 0)
        self.identity: Identity | None = None
        self.rotations = 0
        self.bundle_updates = 0
        self.source = None
        self.worker: int | None = None

    # Connections, as the proxy sees them.

    def accepted(self) -> None:
        """
        A connection was accepted on the listener.
        """
        self.accept_total += 1

    def accept_succeeded(self) -> None:
        """
        The accepted side is ready: its TLS handshake (if any) succeeded.
        """
        self.accept_success += 1

    def handshake_done(self, seconds: float, resumed: bool = False) -> None:
        """
        A TLS handshake of the tunnel's TLS side completed in C{seconds};
        C{resumed} if it resumed an earlier session.
        """
        self.handshake.update(seconds)
        if resumed:
            self.resumed += 1

    def opened(self) -> None:
        """
        Both sides are joined: bytes flow.
        """
        self.conn_open += 1

    def closed(self, lifetime: float) -> None:
        """
        A joined connection ended after C{lifetime} seconds.
        """
        self.conn_open = max(self.conn_open - 1, 0)
        self.lifetime.update(lifetime)

    def accept_failed(self) -> None:
        """
        The accepted side went away before it was ready.
        """
        self.accept_error += 1

    def accept_timed_out(self) -> None:
        """
        The accepted side's TLS handshake outlasted C{--connect-timeout}.
        """
        self.accept_timeout += 1
        self.refused("handshake-timeout")

    def conn_timed_out(self) -> None:
        """
        Reaching the target outlasted C{--connect-timeout}.
        """
        self.conn_timeout += 1

    def refused(self, reason: str) -> None:
        """
        A peer was refused for C{reason}.
        """
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    # Identity, as the service sees it.

    def identity_updated(self, identity: Identity) -> None:
        """
        A new identity went into service; count rotations and bundle changes.
        """
        previous, self.identity = self.identity, identity
        if previous is None:
            return
        if identity.serial != previous.serial:
            self.rotations += 1
        if _bundle_fingerprint(identity) != _bundle_fingerprint(previous):
            self.bundle_updates += 1

    def seconds_to_expiry(self, now: float | None = None) -> float | None:
        """
        Seconds until the current certificate expires (negative once it
        has), or L{None} when there is none.
        """
        if self.identity is None or self.identity.not_after is None:
            return None
        if now is None:
            now = time.time()
        return self.identity.not_after.timestamp() - now

    @property
    def workload_api_reconnects(self) -> int:
        return getattr(self.source, "reconnects", 0)

    @property
    def workload_api_connected(self) -> bool | None:
        state = getattr(self.source, "connection_state", None)
        return None if state is None else state == "connected"

    # Reports.

    def samples(self, prefix: str) -> list[tuple[str, float]]:
        """
        Every metric as a dotted name under C{prefix} and its value.
        """
        named: list[tuple[str, float]] = [
            ("accept.total", self.accept_total),
            ("accept.success", self.accept_success),
            ("accept.error", self.accept_error),
            ("accept.timeout", self.accept_timeout),
            ("conn.open", self.conn_open),
            ("conn.timeout", self.conn_timeout),
            ("conn.resumed", self.resumed),
        ]
        for name, timer in (("conn.lifetime", self.lifetime),
                            ("conn.handshake", self.handshake)):
            named += [(f"{name}.{suffix}", value) for suffix, value in timer.summary()]
        named += [
            (f"refused.{reason}", count) for reason, count in sorted(self.refusals.items())
        ]
        named += self._identity_samples()
        return [(f"{prefix}.{name}" if prefix else name, value) for name, value in named]

    def _identity_samples(self) -> list[tuple[str, float]]:
        named: list[tuple[str, float]] = []
        expiry = self.seconds_to_expiry()
        if expiry is not None:
            named.append(("identity.expiry_seconds", round(expiry, 3)))
        named += [
            ("identity.rotations", self.rotations),
            ("identity.bundle_updates", self.bundle_updates),
        ]
        connected = self.workload_api_connected
        if connected is not None:
            named += [
                ("workload_api.connected", int(connected)),
                ("workload_api.reconnects", self.workload_api_reconnects),
            ]
        return named

    def json_records(self, prefix: str, now: float | None = None) -> list[dict]:
        """
        The metrics as ghostunnel's JSON list: one object per metric with
        C{metric}, C{value}, C{timestamp} and C{hostname}.
        """
        timestamp = int(time.time() if now is None else now)
        hostname = socket.gethostname()
        worker = {} if self.worker is None else {"worker": self.worker}
        return [
            {"timestamp": timestamp, "metric": name, "value": value,
             "hostname": hostname, **worker}
            for name, value in self.samples(prefix)
        ]

    def json_bytes(self, prefix: str) -> bytes:
        """
        L{json_records} encoded.
        """
        return json.dumps(self.json_records(prefix)).encode()

    def graphite_lines(self, prefix: str, now: float | None = None) -> bytes:
        """
        The metrics in Graphite's plaintext protocol: C{name value time}.
        """
        timestamp = int(time.time() if now is None else now)
        if self.worker is not None:
            prefix = ".".join(filter(None, (prefix, f"worker{self.worker}")))
        return b"".join(
            f"{name} {value:g} {timestamp}\n".encode()
            for name, value in self.samples(prefix)
        )


def _bundle_fingerprint(identity: Identity) -> tuple:
    return tuple(
        (name, tuple(sorted(ca.fingerprint(hashes.SHA256()) for ca in cas)))
        for name, cas in identity.bundles.items()
    )


_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(dotted: str) -> str:
    """
    A dotted metric name with every character Prometheus forbids turned
    into an underscore, as ghostunnel writes its names.
    """
    return _INVALID.sub("_", dotted)


class TunnelCollector:
    """
    A Prometheus collector reading one L{TunnelMetrics} at scrape time.

    Connection metrics are gauges named as ghostunnel names them (timers
    as C{_count}, C{_sum}, C{_min}, C{_max}, C{_mean}, C{_std_dev},
    C{_variance}, C{_rate1}, C{_rate5}, C{_rate15}, C{_rate_mean}, and a
    C{_timer} summary with quantiles); refusals and identity events are
    counters, refusals labelled by reason.
    """

    def __init__(self, metrics: TunnelMetrics, prefix: str) -> None:
        self.metrics = metrics
        self.prefix = prefix

    def _name(self, dotted: str) -> str:
        return prometheus_name(f"{self.prefix}.{dotted}" if self.prefix else dotted)

    def collect(self) -> Iterator:
        worker = self.metrics.worker
        for family in self._families():
            if worker is not None:
                family.samples = [
                    sample._replace(labels={**sample.labels, "worker": str(worker)})
                    for sample in family.samples
                ]
            yield family

    def _families(self) -> Iterator:
        m = self.metrics
        for dotted, value in (
            ("accept.total", m.accept_total),
            ("accept.success", m.accept_success),
            ("accept.error", m.accept_error),
            ("accept.timeout", m.accept_timeout),
            ("conn.open", m.conn_open),
            ("conn.timeout", m.conn_timeout),
            ("conn.resumed", m.resumed),
        ):
            yield GaugeMetricFamily(self._name(dotted), dotted, value=value)

        yield from self._timer("conn.lifetime", m.lifetime)
        yield from self._timer("conn.handshake", m.handshake)
        yield from self._identity()

    def _timer(self, dotted: str, timer: Timer) -> Iterable:
        base = self._name(dotted)
        stats = (
            ("count", timer.count),
            ("sum", timer.total),
            ("min", timer.min),
            ("max", timer.max),
            ("mean", timer.mean),
            ("std_dev", math.sqrt(timer.variance)),
            ("variance", timer.variance),
            ("rate1", timer.rate(1)),
            ("rate5", timer.rate(5)),
            ("rate15", timer.rate(15)),
            ("rate_mean", timer.mean_rate),
        )
        for suffix, value in stats:
            unit = "per second" if suffix.startswith("rate") else "nanoseconds"
            if suffix in ("count", "variance"):
                unit = "events" if suffix == "count" else "square nanoseconds"
            yield GaugeMetricFamily(
                f"{base}_{suffix}", f"{dotted} {suffix} ({unit})", value=value
            )

        summary = SummaryMetricFamily(
            f"{base}_timer", f"{dotted} in nanoseconds",
            count_value=timer.count, sum_value=timer.total,
        )
        for fraction in (0.5, 0.95, 0.99, 0.999):
            labels = {"quantile": f"{fraction:g}"}
            value = timer.percentile(fraction)
            summary.samples.append(Sample(f"{base}_timer", labels, value))
        yield summary

    def _identity(self) -> Iterable:
        m = self.metrics
        refused = CounterMetricFamily(
            self._name("refused"), "connections refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(m.refusals.items()):
            refused.add_metric([reason], count)
        yield refused

        expiry = m.seconds_to_expiry()
        if expiry is not None:
            yield GaugeMetricFamily(
                self._name("identity.expiry_seconds"),
                "seconds until the current certificate expires",
                value=expiry,
            )
        yield CounterMetricFamily(
            self._name("identity.rotations"),
            "certificates replaced by a new one", value=m.rotations,
        )
        yield CounterMetricFamily(
            self._name("identity.bundle_updates"),
            "changes of the trust bundle set", value=m.bundle_updates,
        )
        connected = m.workload_api_connected
        if connected is not None:
            yield GaugeMetricFamily(
                self._name("workload_api.connected"),
                "1 while the Workload API stream is connected",
                value=int(connected),
            )
            yield CounterMetricFamily(
                self._name("workload_api.reconnects"),
                "Workload API connections re-established after a loss",
                value=m.workload_api_reconnects,
            )


def prometheus_registry(metrics: TunnelMetrics, prefix: str) -> CollectorRegistry:
    """
    A registry of this tunnel's own, holding only its collector.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TunnelCollector(metrics, prefix))
    return registry


def prometheus_text(registry: CollectorRegistry) -> bytes:
    """
    The registry in Prometheus' text exposition format.
    """
    return generate_latest(registry)
