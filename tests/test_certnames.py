"""
Tables for access control by certificate names and SPKI pins, and for the
host name check a client makes outside SPIFFE mode.
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from ghosttwist.auth.certnames import (
    InvalidRule,
    NameRules,
    Names,
    SpkiPin,
    UriRule,
    check_server_name,
    spki_der,
    spki_pin,
)
from tests.pki import mint

PEER = mint(
    "client1",
    ou="team-a",
    dns=["client1.test", "*.pool.test"],
    ips=["127.0.0.7", "::1"],
    uris=["spiffe://example.test/ns/a/client1", "https://client1.test/id"],
)
BARE = mint("bare")


@pytest.mark.parametrize(
    "rules, allowed, reason",
    [
        (dict(common_names=["client1"]), True, "CN client1"),
        (dict(common_names=["Client1"]), False, ""),
        (dict(common_names=["client"]), False, ""),
        (dict(organizational_units=["team-a"]), True, "OU team-a"),
        (dict(organizational_units=["team-b"]), False, ""),
        (dict(dns_names=["client1.test"]), True, "DNS client1.test"),
        (dict(dns_names=["x.pool.test"]), False, ""),
        (dict(dns_names=["*.pool.test"]), True, "DNS *.pool.test"),
        (dict(ip_addresses=["127.0.0.7"]), True, "IP 127.0.0.7"),
        (dict(ip_addresses=["0:0:0:0:0:0:0:1"]), True, "IP ::1"),
        (dict(ip_addresses=["127.0.0.8"]), False, ""),
        (dict(uris=["https://client1.test/id"]), True, "URI https://client1.test/id"),
        (dict(uris=["https://client1.test/"]), False, ""),
        (dict(uris=["spiffe://example.test/ns/a/client1"]), True, "URI spiffe"),
        (dict(uris=["spiffe://example.test/ns/*/client1"]), True, "URI spiffe"),
        (dict(uris=["spiffe://example.test/ns/**"]), True, "URI spiffe"),
        (dict(uris=["spiffe://example.test/ns/b/*"]), False, ""),
        (dict(uris=["spiffe://other.test/ns/a/client1"]), False, ""),
        (dict(common_names=["nobody"], dns_names=["client1.test"]), True, "DNS"),
        (dict(common_names=["nobody"], ip_addresses=["10.0.0.1"]), False, ""),
    ],
)
def test_name_rules(rules, allowed, reason):
    decision = NameRules(**rules).check(PEER.cert)

    assert decision.allowed is allowed
    if allowed:
        assert reason in decision.reason
    else:
        assert "matches no allowed name" in decision.reason


def test_rules_match_nothing_on_a_certificate_without_names():
    rules = NameRules(
        organizational_units=["team-a"], dns_names=["client1.test"],
        ip_addresses=["127.0.0.7"], uris=["https://client1.test/id"],
    )

    assert not rules.check(BARE.cert).allowed


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_pin_matches_its_key_only(algorithm):
    digest = hashlib.new(algorithm, spki_der(PEER.cert)).digest()
    text = f"{algorithm}:{base64.b64encode(digest).decode()}"

    assert spki_pin(PEER.cert, algorithm) == text
    assert NameRules(pins=[text]).check(PEER.cert).allowed
    refused = NameRules(pins=[text]).check(BARE.cert)
    assert not refused.allowed
    assert refused.reason == "public key matches no pinned SPKI hash"


@pytest.mark.parametrize(
    "text, message",
    [
        ("sha256", "ALGO:BASE64"),
        ("md5:AAAA", "ALGO:BASE64"),
        ("sha256:not base64!", "bad base64"),
        ("sha256:" + base64.b64encode(b"x" * 31).decode(), "32 bytes"),
        ("sha512:" + base64.b64encode(b"x" * 32).decode(), "64 bytes"),
    ],
)
def test_bad_pins_are_refused(text, message):
    with pytest.raises(InvalidRule, match=message):
        SpkiPin.parse(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not a URI"),
        ("no-scheme", "not a URI"),
        ("https://a b", "not a URI"),
        ("spiffe://*/x", "trust domain"),
        ("spiffe://example.test/a/**/b", "last path segment"),
    ],
)
def test_bad_uri_rules_are_refused(text, message):
    with pytest.raises(InvalidRule, match=message):
        UriRule.parse(text)


def test_bad_ip_rule_is_refused():
    with pytest.raises(InvalidRule, match="not an IP address"):
        NameRules(ip_addresses=["localhost"])


def test_spiffe_rule_never_matches_an_invalid_spiffe_id():
    assert not UriRule.parse("spiffe://example.test/*").matches(
        "spiffe://example.test/a?b"
    )


def test_names_describe_prefers_uri_then_cn():
    assert Names.of(PEER.cert).describe() == "spiffe://example.test/ns/a/client1"
    assert Names.of(BARE.cert).describe() == "CN=bare"


SERVER = mint("server.test", dns=["server.test", "*.pool.test"], ips=["127.0.0.1"])


@pytest.mark.parametrize(
    "certificate, name, ok",
    [
        (SERVER, "server.test", True),
        (SERVER, "SERVER.test", True),
        (SERVER, "a.pool.test", True),
        (SERVER, "a.b.pool.test", False),
        (SERVER, "other.test", False),
        (SERVER, "127.0.0.1", True),
        (SERVER, "127.0.0.2", False),
        (mint("server.test"), "server.test", False),
    ],
    ids=[
        "dns", "case", "wildcard", "wildcard-one-label", "other-name", "ip",
        "other-ip", "cn-is-not-enough",
    ],
)
def test_server_name_check(certificate, name, ok):
    problem = check_server_name(certificate.cert, name)

    assert (problem is None) is ok
    if not ok:
        assert name in problem or "cannot be checked" in problem


def test_only_the_last_common_name_counts():
    """
    With CN repeated in the subject, only the last one is the certificate's
    common name, as in Go's crypto/x509: the earlier one cannot be matched.
    """
    import datetime

    from cryptography import x509 as _x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from ghosttwist.auth.certnames import Names

    key = ec.generate_private_key(ec.SECP256R1())
    subject = _x509.Name(
        [
            _x509.NameAttribute(NameOID.COMMON_NAME, "client1"),
            _x509.NameAttribute(NameOID.COMMON_NAME, "evil"),
        ]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        _x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )

    assert Names.of(certificate).common_names == ("evil",)
