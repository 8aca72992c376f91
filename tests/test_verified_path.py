"""
Peer verification when OpenSSL's store holds exactly one trust domain: the
chain OpenSSL verified is not verified a second time, and every peer a
second verification would refuse is still refused during the handshake.
Real TLS between two in-memory protocols (twisted.test.iosim).
"""

from __future__ import annotations

import datetime

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient

from ghosttwist.auth.policy import Authorizer
from ghosttwist.auth.svid import BundleVerifier, SvidError
from ghosttwist.halfclose import HalfCloseTLSFactory
from ghosttwist.identity import Identity
from ghosttwist.tls import ContextHolder, PeerPolicy, build_context
from tests import certs
from tests.test_halfclose_tls import Recorder

_NOW = datetime.datetime.now(datetime.timezone.utc)
_HOUR = datetime.timedelta(hours=1)
_VALID = {"not_before": _NOW - _HOUR, "not_after": _NOW + _HOUR}
_CA = certs.root_ca("domain.test CA", uris=["spiffe://domain.test"], **_VALID)
_FED = certs.root_ca("fed.test CA", uris=["spiffe://fed.test"], **_VALID)
_STRANGER = certs.root_ca("stranger CA", **_VALID)
_FRONTEND = "spiffe://domain.test/frontend"
_BACKEND = "spiffe://domain.test/backend"
_ONE = {"domain.test": (_CA.cert,)}
_TWO = {"domain.test": (_CA.cert,), "fed.test": (_FED.cert,)}


def _identity(issued: certs.Issued, *middle: certs.Issued, bundles=None) -> Identity:
    return Identity(
        chain=(issued.cert, *(m.cert for m in middle)),
        key=issued.key,
        bundles=bundles or _ONE,
    )


def _holder(identity: Identity, server: bool, allowed: str) -> ContextHolder:
    def build(current: Identity):
        policy = PeerPolicy(BundleVerifier(current.bundles), Authorizer(patterns=(allowed,)))
        return build_context(current, server=server, policy=policy)

    holder = ContextHolder(build)
    holder.update(identity)
    return holder


def _handshake(client_identity: Identity, server_bundles=None):
    """
    A server for domain.test/backend allowing domain.test/frontend, and a
    client presenting C{client_identity}; the server's side, after the
    handshake ran as far as it goes.
    """
    clock = Clock()
    backend = certs.leaf(_CA, _BACKEND, **_VALID)
    server_holder = _holder(_identity(backend, bundles=server_bundles), True, _FRONTEND)
    client_holder = _holder(client_identity, False, _BACKEND)
    server_factory = HalfCloseTLSFactory(
        server_holder, False, Factory.forProtocol(Recorder), clock
    )
    client_factory = HalfCloseTLSFactory(
        client_holder, True, Factory.forProtocol(Recorder), clock
    )
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
        greet=False,
    )
    server.app = server.wrappedProtocol
    pump.flush()
    return server


def _never_verify_again(monkeypatch) -> None:
    def second_verification(*args, **kwargs):
        raise AssertionError("the chain was verified a second time")

    monkeypatch.setattr(BundleVerifier, "_verify_path", second_verification)


def test_one_trust_domain_is_verified_once(monkeypatch):
    """
    With one trust domain, a valid client is allowed without a second
    verification of its chain.
    """
    _never_verify_again(monkeypatch)
    server = _handshake(_identity(certs.leaf(_CA, _FRONTEND, **_VALID)))

    assert server.app.handshake
    assert server.handshake.refusal is None
    assert server.handshake.peer_id == _FRONTEND


def _forged():
    return _identity(certs.leaf(_CA, _FRONTEND, sign_with=certs.new_key(), **_VALID))


def _stranger():
    return _identity(certs.leaf(_STRANGER, _FRONTEND, **_VALID))


def _expired():
    return _identity(
        certs.leaf(_CA, _FRONTEND, not_before=_NOW - 3 * _HOUR, not_after=_NOW - _HOUR)
    )


def _two_uris():
    return _identity(
        certs.leaf(_CA, uris=[_FRONTEND, "spiffe://domain.test/x"], **_VALID)
    )


def _no_spiffe_id():
    return _identity(certs.leaf(_CA, uris=["https://example.test/"], **_VALID))


def _cert_sign():
    return _identity(certs.leaf(_CA, _FRONTEND, key_cert_sign=True, **_VALID))


def _other_domain():
    return _identity(certs.leaf(_CA, "spiffe://other.test/frontend", **_VALID))


def _middle_not_ca():
    middle = certs.intermediate_ca(_CA, ca=False, **_VALID)
    return _identity(certs.leaf(middle, _FRONTEND, **_VALID), middle)


def _middle_without_cert_sign():
    middle = certs.intermediate_ca(_CA, key_cert_sign=False, **_VALID)
    return _identity(certs.leaf(middle, _FRONTEND, **_VALID), middle)


REFUSED = [
    pytest.param(_forged, "untrusted-chain", id="forged-signature"),
    pytest.param(_stranger, "untrusted-chain", id="ca-not-in-bundle"),
    pytest.param(_expired, "expired", id="expired"),
    pytest.param(_two_uris, "multiple-uri-sans", id="two-uri-sans"),
    pytest.param(_no_spiffe_id, "no-spiffe-id", id="no-spiffe-id"),
    pytest.param(_cert_sign, "key-usage", id="leaf-may-sign-certificates"),
    pytest.param(_other_domain, "unknown-trust-domain", id="other-trust-domain"),
    pytest.param(_middle_not_ca, "intermediate-not-ca", id="intermediate-not-ca"),
    pytest.param(
        _middle_without_cert_sign, "intermediate-not-ca", id="intermediate-no-certsign"
    ),
]


@pytest.mark.parametrize("make, reason", REFUSED)
def test_one_trust_domain_still_refuses(make, reason):
    """
    Every client a second verification would refuse is refused without it
    (the setup of L{test_one_trust_domain_is_verified_once}), for the same
    reason, before the handshake completes.
    """
    server = _handshake(make())

    assert not server.app.handshake
    assert server.handshake.refusal == reason, server.handshake.detail


def test_federated_ca_cannot_vouch_for_a_local_id():
    """
    With two trust domains OpenSSL's store binds no CA to its domain: the
    chain is verified again against the peer's own domain, so fed.test's CA
    signing a domain.test ID is refused.
    """
    client = _identity(certs.leaf(_FED, _FRONTEND, **_VALID), bundles=_TWO)
    server = _handshake(client, server_bundles=_TWO)

    assert not server.app.handshake
    assert server.handshake.refusal == "untrusted-chain"


def test_verified_path_checks_the_spiffe_rules_on_its_own():
    """
    L{BundleVerifier.authenticate_verified_path} checks the leaf rules and
    the path's shape; it does not redo signatures.
    """
    verifier = BundleVerifier(_ONE)
    good = certs.leaf(_CA, _FRONTEND, **_VALID).cert
    assert str(verifier.authenticate_verified_path([good, _CA.cert])) == _FRONTEND

    ca_leaf = certs.issue("ca leaf", issuer=_CA, ca=True, uris=[_FRONTEND], **_VALID)
    with pytest.raises(SvidError) as caught:
        verifier.authenticate_verified_path([ca_leaf.cert, _CA.cert])
    assert caught.value.reason == "leaf-is-ca"

    with pytest.raises(SvidError) as caught:
        verifier.authenticate_verified_path([good])
    assert caught.value.reason == "untrusted-chain"
