"""
The metrics in memory: timers, identity counters, and the JSON, Graphite
and Prometheus renderings of one tunnel's numbers.
"""

from __future__ import annotations

import datetime
import json

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from spiffe import SpiffeId

from ghosttwist.identity import Identity
from ghosttwist.metrics import (
    Timer,
    TunnelMetrics,
    prometheus_registry,
    prometheus_text,
)
from tests import certs


def _identity(root, **kwargs) -> Identity:
    issued = certs.leaf(root, **kwargs)
    return Identity(
        chain=(issued.cert,),
        key=issued.key,
        bundles={"domain.test": (root.cert,)},
        spiffe_id=SpiffeId("spiffe://domain.test/workload"),
    )


def _prometheus(metrics: TunnelMetrics, prefix: str) -> dict[str, float]:
    text = prometheus_text(prometheus_registry(metrics, prefix)).decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if sample.labels:
                key += "{" + ",".join(f"{k}={v}" for k, v in sample.labels.items()) + "}"
            values[key] = sample.value
    return values


def test_timer_reports_nanoseconds_and_percentiles():
    """
    Seconds go in; count, extremes, mean and percentiles come out in
    nanoseconds.
    """
    timer = Timer(clock=lambda: 0.0)
    for milliseconds in range(1, 101):
        timer.update(milliseconds / 1000)

    stats = dict(timer.summary())

    assert stats["count"] == 100
    assert stats["min"] == 1e6
    assert stats["max"] == 100e6
    assert abs(stats["mean"] - 50.5e6) < 1
    assert abs(stats["50-percentile"] - 50.5e6) < 1
    assert abs(stats["99-percentile"] - 99.99e6) < 1e3


def test_timer_rates_follow_the_clock():
    """
    Events counted in one five-second tick become a rate per second.
    """
    now = [0.0]
    timer = Timer(clock=lambda: now[0])
    for _ in range(10):
        timer.update(0.001)
    now[0] = 5.0

    assert timer.rate(1) == 2.0
    assert timer.mean_rate == 2.0


def test_rotation_and_bundle_updates_are_counted_apart():
    """
    A new serial is a rotation; a changed CA set is a bundle update; the
    first identity is neither.
    """
    root, other_root = certs.root_ca(), certs.root_ca("Other Root")
    metrics = TunnelMetrics()
    second = _identity(root)

    metrics.identity_updated(_identity(root))
    metrics.identity_updated(second)
    metrics.identity_updated(
        Identity(second.chain, second.key, {"domain.test": (root.cert, other_root.cert)})
    )

    assert (metrics.rotations, metrics.bundle_updates) == (1, 1)


def test_json_names_follow_ghostunnel_under_the_prefix():
    """
    JSON is ghostunnel's list of {metric, value, timestamp, hostname}, with
    the prefix in front of ghostunnel's dotted names.
    """
    metrics = TunnelMetrics()
    metrics.accepted()
    metrics.accept_succeeded()
    metrics.handshake_done(0.002)

    records = json.loads(metrics.json_bytes("ghostunnel"))
    values = {record["metric"]: record["value"] for record in records}

    assert values["ghostunnel.accept.total"] == 1
    assert values["ghostunnel.accept.success"] == 1
    assert values["ghostunnel.conn.handshake.count"] == 1
    assert values["ghostunnel.conn.handshake.max"] == 2e6
    assert values["ghostunnel.refused.unauthorized"] == 0
    assert set(records[0]) == {"metric", "value", "timestamp", "hostname"}


def test_resumed_handshakes_are_counted():
    metrics = TunnelMetrics()
    metrics.handshake_done(0.002)
    metrics.handshake_done(0.001, resumed=True)

    values = dict(metrics.samples("ghosttwist"))

    assert values["ghosttwist.conn.resumed"] == 1
    assert values["ghosttwist.conn.handshake.count"] == 2


def test_graphite_lines_carry_name_value_and_time():
    metrics = TunnelMetrics()
    metrics.accepted()

    lines = metrics.graphite_lines("gt", now=1700000000).decode().splitlines()

    assert "gt.accept.total 1 1700000000" in lines


def test_prometheus_names_and_refusal_labels():
    """
    Prometheus names are the dotted names with underscores; refusals are
    one counter labelled by reason.
    """
    metrics = TunnelMetrics()
    metrics.accepted()
    metrics.opened()
    metrics.refused("unauthorized")
    metrics.accept_timed_out()

    values = _prometheus(metrics, "ghostunnel")

    assert values["ghostunnel_accept_total"] == 1
    assert values["ghostunnel_conn_open"] == 1
    assert values["ghostunnel_accept_timeout"] == 1
    assert values["ghostunnel_refused_total{reason=unauthorized}"] == 1
    assert values["ghostunnel_refused_total{reason=handshake-timeout}"] == 1
    assert values["ghostunnel_conn_handshake_timer_count"] == 0
    assert "ghostunnel_conn_lifetime_timer{quantile=0.99}" in values


def test_each_tunnel_has_its_own_registry():
    """
    Two tunnels never mix numbers, and the process-wide registry is left
    alone.
    """
    one, two = TunnelMetrics(), TunnelMetrics()
    one.accepted()

    assert _prometheus(one, "gt")["gt_accept_total"] == 1
    assert _prometheus(two, "gt")["gt_accept_total"] == 0
    assert REGISTRY.get_sample_value("gt_accept_total") is None


def test_expiry_seconds_counts_down_to_the_leaf_not_after():
    root = certs.root_ca()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    not_after = now + datetime.timedelta(hours=1)
    metrics = TunnelMetrics()
    metrics.identity_updated(_identity(root, not_after=not_after))

    remaining = metrics.seconds_to_expiry(now=not_after.timestamp() - 90)

    assert round(remaining) == 90
    assert "gt_identity_expiry_seconds" in _prometheus(metrics, "gt")
