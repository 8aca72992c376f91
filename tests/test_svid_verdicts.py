"""
The SPIFFE rules' outcomes are remembered per certificate (by its DER
bytes) so that a peer presenting the same SVID on every connection is not
parsed again each time; what depends on the time or the bundles is checked
on every call all the same.
"""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ghosttwist.auth.svid import BundleVerifier, SvidError, _Verdicts
from tests import certs
from tests.certs import NOW

_DAY = datetime.timedelta(days=1)
_CA = certs.root_ca("domain.test CA", uris=["spiffe://domain.test"])
_OTHER = certs.root_ca("other.test CA", uris=["spiffe://other.test"])


def _fresh(cert: x509.Certificate) -> x509.Certificate:
    """
    The same certificate as a new object, as each handshake hands it over.
    """
    return x509.load_der_x509_certificate(cert.public_bytes(Encoding.DER))


def test_the_same_leaf_authenticates_the_same_every_time():
    leaf = certs.leaf(_CA, "spiffe://domain.test/web").cert
    verifier = BundleVerifier({"domain.test": (_CA.cert,)})

    ids = {str(verifier.authenticate([_fresh(leaf)], NOW)) for _ in range(3)}

    assert ids == {"spiffe://domain.test/web"}


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (
            {"uris": ["spiffe://domain.test/a", "spiffe://domain.test/b"]},
            "multiple-uri-sans",
        ),
        ({"uris": []}, "no-spiffe-id"),
        ({"ca": True}, "leaf-is-ca"),
        ({"key_cert_sign": True}, "key-usage"),
    ],
)
def test_a_refused_leaf_is_refused_every_time(kwargs, reason):
    leaf = certs.leaf(_CA, **kwargs).cert
    verifier = BundleVerifier({"domain.test": (_CA.cert,)})

    errors = []
    for _ in range(3):
        with pytest.raises(SvidError) as caught:
            verifier.authenticate([_fresh(leaf)], NOW)
        errors.append((caught.value.reason, caught.value.detail))

    assert errors[0][0] == reason
    assert errors == [errors[0]] * 3


def test_a_remembered_leaf_is_still_checked_against_time_and_bundles():
    """
    A leaf that passed once is refused once it has expired, and by a
    verifier without its trust domain: only the rules on its content are
    remembered.
    """
    leaf = certs.leaf(_CA, "spiffe://domain.test/web", not_after=NOW + _DAY).cert
    ours = BundleVerifier({"domain.test": (_CA.cert,)})
    theirs = BundleVerifier({"other.test": (_OTHER.cert,)})
    ours.authenticate([_fresh(leaf)], NOW)

    with pytest.raises(SvidError) as expired:
        ours.authenticate([_fresh(leaf)], now=NOW + 2 * _DAY)
    with pytest.raises(SvidError) as foreign:
        theirs.authenticate([_fresh(leaf)], NOW)

    assert expired.value.reason == "expired"
    assert foreign.value.reason == "unknown-trust-domain"


def test_a_non_ca_intermediate_is_refused_every_time():
    middle = certs.intermediate_ca(_CA, ca=False)
    leaf = certs.leaf(middle, "spiffe://domain.test/web").cert
    verifier = BundleVerifier({"domain.test": (_CA.cert,)})

    for _ in range(2):
        with pytest.raises(SvidError) as caught:
            verifier.authenticate([_fresh(leaf), _fresh(middle.cert)], NOW)
        assert caught.value.reason == "intermediate-not-ca"


def test_outcomes_are_remembered_by_content_and_bounded():
    checked = []

    def check(cert: x509.Certificate) -> str:
        checked.append(cert)
        return str(cert.serial_number)

    verdicts = _Verdicts(check, size=2)
    first, second, third = (certs.leaf(_CA).cert for _ in range(3))

    assert verdicts(first) == verdicts(_fresh(first)) == str(first.serial_number)
    assert len(checked) == 1

    verdicts(second)
    verdicts(third)
    verdicts(first)

    assert len(verdicts._outcomes) == 2
    assert len(checked) == 4
