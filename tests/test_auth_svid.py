"""
Tests for L{ghosttwist.auth.svid}: X509-SVID authentication, as a table of
chains and the reason each is refused for.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import attrs
import pytest
from cryptography import x509

from ghosttwist.auth import (
    MAX_INTERMEDIATES,
    REASONS,
    BundleVerifier,
    SvidError,
    authenticate,
    spiffe_id_of,
)
from tests import certs
from tests.certs import NOW

DOMAIN = "domain.test"
OTHER = "other.test"
FED = "fed.test"
WORKLOAD = "spiffe://domain.test/workload"
DAY = datetime.timedelta(days=1)


@attrs.frozen
class World:
    """
    Three trust domains, each with its own root CA, and bundles for all.
    """

    domain: certs.Issued
    other: certs.Issued
    fed: certs.Issued

    @property
    def bundles(self) -> dict[str, list[x509.Certificate]]:
        return {
            DOMAIN: [self.domain.cert],
            OTHER: [self.other.cert],
            FED: [self.fed.cert],
        }


@pytest.fixture(scope="module")
def world() -> World:
    return World(
        domain=certs.root_ca("Domain Root"),
        other=certs.root_ca("Other Root"),
        fed=certs.root_ca("Federated Root"),
    )


Case = Callable[[World], tuple[list[x509.Certificate], dict]]


def _leaf_chain(**kwargs: object) -> Case:
    def make(w: World) -> tuple[list[x509.Certificate], dict]:
        return [certs.leaf(w.domain, **kwargs).cert], w.bundles

    return make


def _wrong_trust_domain(w: World):
    # An ID in other.test, signed by domain.test's CA.
    leaf = certs.leaf(w.domain, "spiffe://other.test/workload")
    return [leaf.cert], w.bundles


def _ca_removed(w: World):
    leaf = certs.leaf(w.domain)
    bundles = dict(w.bundles, **{DOMAIN: [certs.root_ca("New Domain Root").cert]})
    return [leaf.cert], bundles


def _federated_ca_vouches(w: World):
    # fed.test's CA is trusted, but only for fed.test.
    leaf = certs.leaf(w.fed, WORKLOAD)
    return [leaf.cert], w.bundles


def _federated_intermediate(w: World):
    # A CA from fed.test's bundle, sent by the peer as an intermediate.
    return [certs.leaf(w.fed).cert, w.fed.cert], w.bundles


def _unknown_trust_domain(w: World):
    leaf = certs.leaf(w.domain, "spiffe://nowhere.test/workload")
    return [leaf.cert], w.bundles


def _through_intermediate(w: World):
    middle = certs.intermediate_ca(w.domain)
    return [certs.leaf(middle).cert, middle.cert], w.bundles


def _through_intermediate_and_root(w: World):
    middle = certs.intermediate_ca(w.domain)
    return [certs.leaf(middle).cert, middle.cert, w.domain.cert], w.bundles


def _intermediate_in_bundle(w: World):
    # A bundle may list a CA that is not self-signed; it is an anchor.
    middle = certs.intermediate_ca(w.domain)
    return [certs.leaf(middle).cert], {DOMAIN: [middle.cert]}


def _intermediate_not_ca(w: World):
    middle = certs.intermediate_ca(w.domain, ca=False)
    return [certs.leaf(middle).cert, middle.cert], w.bundles


def _intermediate_without_basic_constraints(w: World):
    middle = certs.intermediate_ca(w.domain, ca=None, key_cert_sign=True)
    return [certs.leaf(middle).cert, middle.cert], w.bundles


def _intermediate_without_cert_sign(w: World):
    middle = certs.intermediate_ca(w.domain, key_cert_sign=False)
    return [certs.leaf(middle).cert, middle.cert], w.bundles


def _intermediate_expired(w: World):
    middle = certs.intermediate_ca(w.domain, not_after=NOW - DAY)
    return [certs.leaf(middle).cert, middle.cert], w.bundles


def _root_expired(w: World):
    root = certs.root_ca("Expired Root", not_after=NOW - DAY)
    return [certs.leaf(root).cert], {DOMAIN: [root.cert]}


def _missing_intermediate(w: World):
    middle = certs.intermediate_ca(w.domain)
    return [certs.leaf(middle).cert], w.bundles


def _long_chain(count: int, with_root: bool = False) -> Case:
    def make(w: World):
        issuers = [w.domain]
        for i in range(count):
            issuers.append(certs.intermediate_ca(issuers[-1], f"Intermediate {i}"))
        middles = [c.cert for c in reversed(issuers[1:])]
        if with_root:
            middles.append(w.domain.cert)
        return [certs.leaf(issuers[-1]).cert, *middles], w.bundles

    return make


def _forged(w: World):
    # Same issuer name and key identifier as the real CA, a different key.
    leaf = certs.leaf(w.domain, sign_with=certs.new_key())
    return [leaf.cert], w.bundles


def _self_signed_leaf(w: World):
    leaf = certs.issue("workload", uris=[WORKLOAD])
    return [leaf.cert], w.bundles


def _leaf_in_bundle(w: World):
    leaf = certs.issue("workload", uris=[WORKLOAD])
    return [leaf.cert], {DOMAIN: [leaf.cert]}


def _empty_chain(w: World):
    return [], w.bundles


VALID: list = [
    pytest.param(_leaf_chain(), id="leaf-from-root"),
    pytest.param(_leaf_chain(key_type="rsa"), id="rsa-leaf"),
    pytest.param(_leaf_chain(key_type="ed25519"), id="ed25519-leaf"),
    pytest.param(_leaf_chain(key_type="ec"), id="ecdsa-leaf"),
    pytest.param(_leaf_chain(ca=None), id="leaf-without-basic-constraints"),
    pytest.param(
        _leaf_chain(uris=[WORKLOAD], dns_names=["workload.example"]),
        id="leaf-with-dns-san-too",
    ),
    pytest.param(_through_intermediate, id="through-intermediate"),
    pytest.param(_through_intermediate_and_root, id="peer-also-sends-root"),
    pytest.param(_intermediate_in_bundle, id="intermediate-as-anchor"),
    pytest.param(_long_chain(MAX_INTERMEDIATES), id="longest-allowed-chain"),
    pytest.param(
        _long_chain(MAX_INTERMEDIATES, with_root=True),
        id="longest-allowed-chain-and-root",
    ),
]


@pytest.mark.parametrize("make", VALID)
def test_valid(world: World, make: Case) -> None:
    chain, bundles = make(world)
    assert str(BundleVerifier(bundles).authenticate(chain, now=NOW)) == WORKLOAD


def test_valid_now(world: World) -> None:
    """
    Without C{now}, the current time is used, through the cached stores.
    """
    real_now = datetime.datetime.now(datetime.timezone.utc)
    validity = {"not_before": real_now - DAY, "not_after": real_now + DAY}
    root = certs.root_ca("Current Root", **validity)
    leaf = certs.leaf(root, **validity)
    verifier = BundleVerifier({DOMAIN: [root.cert]})
    assert str(verifier.authenticate([leaf.cert])) == WORKLOAD
    assert str(verifier.authenticate([leaf.cert])) == WORKLOAD


INVALID: list = [
    pytest.param(_empty_chain, "no-certificate", id="no-certificate"),
    pytest.param(_wrong_trust_domain, "untrusted-chain", id="wrong-trust-domain"),
    pytest.param(_ca_removed, "untrusted-chain", id="ca-removed-from-bundle"),
    pytest.param(_federated_ca_vouches, "untrusted-chain", id="federated-ca"),
    pytest.param(
        _federated_intermediate, "untrusted-chain", id="federated-ca-in-chain"
    ),
    pytest.param(
        _unknown_trust_domain, "unknown-trust-domain", id="unknown-trust-domain"
    ),
    pytest.param(
        _leaf_chain(uris=[WORKLOAD, "spiffe://domain.test/admin"]),
        "multiple-uri-sans",
        id="two-uri-sans",
    ),
    pytest.param(
        _leaf_chain(uris=[WORKLOAD, "https://example.test/"]),
        "multiple-uri-sans",
        id="spiffe-and-https-uri-sans",
    ),
    pytest.param(_leaf_chain(uris=[]), "no-spiffe-id", id="no-uri-san"),
    pytest.param(
        _leaf_chain(uris=[], dns_names=["workload.example"]),
        "no-spiffe-id",
        id="dns-san-only",
    ),
    pytest.param(
        _leaf_chain(uris=["https://domain.test/workload"]),
        "no-spiffe-id",
        id="https-uri",
    ),
    pytest.param(
        _leaf_chain(ca=True, digital_signature=True, key_cert_sign=False,
                    crl_sign=False),
        "leaf-is-ca",
        id="ca-as-leaf",
    ),
    pytest.param(
        _leaf_chain(digital_signature=False), "key-usage", id="no-digital-signature"
    ),
    pytest.param(_leaf_chain(key_cert_sign=True), "key-usage", id="key-cert-sign"),
    pytest.param(_leaf_chain(crl_sign=True), "key-usage", id="crl-sign"),
    pytest.param(_leaf_chain(key_usage=False), "key-usage", id="no-key-usage"),
    pytest.param(
        _leaf_chain(not_after=NOW - DAY, not_before=NOW - 2 * DAY),
        "expired",
        id="expired",
    ),
    pytest.param(
        _leaf_chain(not_before=NOW + DAY), "not-yet-valid", id="not-yet-valid"
    ),
    pytest.param(_intermediate_expired, "expired", id="intermediate-expired"),
    pytest.param(_root_expired, "expired", id="root-expired"),
    pytest.param(
        _leaf_chain(uris=["spiffe://domain.test"]),
        "invalid-spiffe-id",
        id="id-without-path",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://Domain.test/workload"]),
        "invalid-spiffe-id",
        id="uppercase-trust-domain",
    ),
    pytest.param(
        _leaf_chain(uris=["SPIFFE://domain.test/workload"]),
        "invalid-spiffe-id",
        id="uppercase-scheme",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://domain.test/a/../workload"]),
        "invalid-spiffe-id",
        id="dot-dot-segment",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://domain.test/a//workload"]),
        "invalid-spiffe-id",
        id="empty-segment",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://domain.test/workload/"]),
        "invalid-spiffe-id",
        id="trailing-slash",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://domain.test/work%6Coad"]),
        "invalid-spiffe-id",
        id="percent-encoded",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://domain.test:8443/workload"]),
        "invalid-spiffe-id",
        id="port-in-trust-domain",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://user@domain.test/workload"]),
        "invalid-spiffe-id",
        id="userinfo-in-trust-domain",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://domain.test/workload?x=1"]),
        "invalid-spiffe-id",
        id="query",
    ),
    pytest.param(
        _leaf_chain(uris=["spiffe://domain.test/workload\n"]),
        "invalid-spiffe-id",
        id="trailing-newline",
    ),
    pytest.param(
        _intermediate_not_ca, "intermediate-not-ca", id="intermediate-not-ca"
    ),
    pytest.param(
        _intermediate_without_basic_constraints,
        "intermediate-not-ca",
        id="intermediate-without-basic-constraints",
    ),
    pytest.param(
        _intermediate_without_cert_sign,
        "intermediate-not-ca",
        id="intermediate-without-key-cert-sign",
    ),
    pytest.param(
        _missing_intermediate, "untrusted-chain", id="missing-intermediate"
    ),
    pytest.param(
        _long_chain(MAX_INTERMEDIATES + 1), "chain-too-long", id="path-too-long"
    ),
    pytest.param(
        _long_chain(MAX_INTERMEDIATES + 1, with_root=True),
        "chain-too-long",
        id="peer-sent-too-many",
    ),
    pytest.param(_forged, "untrusted-chain", id="forged-signature"),
    pytest.param(_self_signed_leaf, "untrusted-chain", id="self-signed-leaf"),
    pytest.param(_leaf_in_bundle, "untrusted-chain", id="leaf-is-its-own-anchor"),
]


@pytest.mark.parametrize("make, reason", INVALID)
def test_invalid(world: World, make: Case, reason: str) -> None:
    chain, bundles = make(world)
    with pytest.raises(SvidError) as caught:
        BundleVerifier(bundles).authenticate(chain, now=NOW)

    error = caught.value
    assert error.reason == reason, str(error)
    assert error.reason in REASONS
    assert str(error).startswith(f"{reason}: ")
    assert "\n" not in str(error)


@pytest.mark.parametrize("make, reason", INVALID)
def test_module_function_agrees(world: World, make: Case, reason: str) -> None:
    """
    L{authenticate} gives the same answers as L{BundleVerifier.authenticate}.
    """
    chain, bundles = make(world)
    with pytest.raises(SvidError) as caught:
        authenticate(chain, bundles, now=NOW)
    assert caught.value.reason == reason


def test_module_function_valid(world: World) -> None:
    chain, bundles = _through_intermediate(world)
    assert str(authenticate(chain, bundles, now=NOW)) == WORKLOAD
    assert str(authenticate(chain, bundles, now=NOW)) == WORKLOAD


def test_now_in_another_time_zone(world: World) -> None:
    """
    An aware C{now} in any zone means the same instant.
    """
    leaf = certs.leaf(world.domain, not_after=NOW + datetime.timedelta(hours=1))
    verifier = BundleVerifier(world.bundles)
    later = (NOW + datetime.timedelta(hours=2)).astimezone(
        datetime.timezone(datetime.timedelta(hours=-8))
    )
    with pytest.raises(SvidError) as caught:
        verifier.authenticate([leaf.cert], now=later)
    assert caught.value.reason == "expired"
    assert str(verifier.authenticate([leaf.cert], now=NOW)) == WORKLOAD


def test_spiffe_id_of(world: World) -> None:
    assert str(spiffe_id_of(certs.leaf(world.domain).cert)) == WORKLOAD
    assert spiffe_id_of(certs.leaf(world.domain, uris=[]).cert) is None
    assert spiffe_id_of(world.domain.cert) is None
    two = certs.leaf(world.domain, uris=[WORKLOAD, WORKLOAD + "2"])
    assert spiffe_id_of(two.cert) is None


def test_error_reason_must_be_known() -> None:
    with pytest.raises(ValueError):
        SvidError("made-up", "detail")


@pytest.mark.parametrize(
    "name",
    ["Domain.test", "spiffe://domain.test", "domain.test/x", "", "domain.test\n"],
)
def test_bundle_keys_are_trust_domain_names(world: World, name: str) -> None:
    with pytest.raises(ValueError):
        BundleVerifier({name: [world.domain.cert]})


def test_bundles_are_frozen(world: World) -> None:
    bundles = world.bundles
    verifier = BundleVerifier(bundles)
    bundles[DOMAIN].clear()
    assert verifier.bundles[DOMAIN] == (world.domain.cert,)
    with pytest.raises(TypeError):
        verifier.bundles[DOMAIN] = ()  # type: ignore[index]
    assert "domain.test: 1 CAs" in repr(verifier)
