"""
The status page in memory: its verdict (200 or 503) and the identity
object, for identities valid, expired and absent.
"""

from __future__ import annotations

import datetime
import json

import pytest
from spiffe import SpiffeId
from twisted.internet.defer import succeed
from twisted.web.test.requesthelper import DummyRequest

from ghosttwist.addresses import Address, InvalidAddress
from ghosttwist.config import TunnelConfig
from ghosttwist.identity import Identity
from ghosttwist.metrics import TunnelMetrics
from ghosttwist.status import (
    StatusAddress,
    StatusResource,
    TunnelHealth,
    parse_status_address,
)
from tests import certs

NOW = datetime.datetime.now(datetime.timezone.utc)


def _config() -> TunnelConfig:
    return TunnelConfig(
        mode="server",
        listen=Address("tcp", host="127.0.0.1", port=8443),
        target=Address("tcp", host="127.0.0.1", port=8080),
    )


def _health(not_after: datetime.datetime | None = None) -> TunnelHealth:
    metrics = TunnelMetrics()
    if not_after is not None:
        root = certs.root_ca()
        leaf = certs.leaf(
            root,
            not_before=not_after - datetime.timedelta(hours=2),
            not_after=not_after,
        )
        metrics.identity_updated(
            Identity(
                chain=(leaf.cert,),
                key=leaf.key,
                bundles={"domain.test": (root.cert,)},
                spiffe_id=SpiffeId("spiffe://domain.test/workload"),
            )
        )
    health = TunnelHealth(_config(), metrics)
    health.listening = True
    health.last_reload = NOW.timestamp()
    return health


class _Backend:
    def __init__(self, error: str | None) -> None:
        self.error = error

    def check(self):
        return succeed(self.error)


def _render(health: TunnelHealth, backend_error: str | None = None):
    request = DummyRequest([b""])
    StatusResource(health, _Backend(backend_error)).render_GET(request)
    return request.responseCode or 200, json.loads(b"".join(request.written))


def test_healthy_tunnel_answers_200_with_its_identity():
    now = datetime.datetime.now(datetime.timezone.utc)
    code, document = _render(_health(now + datetime.timedelta(hours=1)))

    assert code == 200
    assert (document["ok"], document["status"], document["message"]) == (
        True, "ok", "listening",
    )
    identity = document["identity"]
    assert identity["spiffe_id"] == "spiffe://domain.test/workload"
    assert identity["trust_domains"] == {"domain.test": 1}
    assert 3500 < identity["seconds_to_expiry"] <= 3600
    assert document["forward_address"] == "127.0.0.1:8080"


def test_expired_identity_answers_503():
    """
    A tunnel whose certificate has expired cannot complete a handshake a
    peer accepts: the status says so even though the backend is fine.
    """
    code, document = _render(_health(NOW - datetime.timedelta(seconds=5)))

    assert code == 503
    assert document["ok"] is False
    assert document["backend_ok"] is True
    assert document["identity"]["ok"] is False
    assert "expired" in document["identity"]["error"]
    assert document["identity"]["seconds_to_expiry"] <= -5


def test_no_identity_yet_answers_503():
    health = _health()
    health.listening = False

    code, document = _render(health)

    assert code == 503
    assert document["message"] == "initializing"
    assert document["identity"]["error"] == "no identity has arrived yet"


def test_backend_down_answers_503_with_the_error():
    code, document = _render(
        _health(NOW + datetime.timedelta(hours=1)), "Connection refused"
    )

    assert code == 503
    assert (document["backend_ok"], document["backend_status"]) == (False, "critical")
    assert document["backend_error"] == "Connection refused"


def test_draining_tunnel_answers_503():
    health = _health(NOW + datetime.timedelta(hours=1))
    health.stopping = True

    code, document = _render(health)

    assert (code, document["message"]) == (503, "stopping")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:6060", StatusAddress("https", Address("tcp", "127.0.0.1", 6060))),
        ("https://[::1]:6060", StatusAddress("https", Address("tcp", "::1", 6060))),
        ("http://localhost:6060", StatusAddress("http", Address("tcp", "localhost", 6060))),
        ("unix:/run/gt.sock", StatusAddress("http", Address("unix", path="/run/gt.sock"))),
        ("systemd:status", StatusAddress("http", systemd_name="status")),
    ],
)
def test_status_address_forms(text, expected):
    assert parse_status_address(text) == expected


@pytest.mark.parametrize(
    "text", ["6060", "ftp://127.0.0.1:6060", "http://unix:/x", "systemd:", "h:99999"]
)
def test_bad_status_addresses_are_refused(text):
    with pytest.raises(InvalidAddress):
        parse_status_address(text)
