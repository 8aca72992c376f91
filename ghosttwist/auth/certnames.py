"""
Access control by certificate names, for identities from files: which
names (CN, OU, DNS, IP, URI) or which public key a peer's already verified
leaf certificate must carry.

Pure functions of a C{cryptography} certificate and configuration, so they
can be tested as tables; the TLS verify callback in L{ghosttwist.tls} calls
them once OpenSSL has verified the chain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from service_identity.exceptions import CertificateError

from ghosttwist.auth.policy import Decision, InvalidPattern, SpiffeIdPattern
from ghosttwist.spiffeid import InvalidSpiffeId, parse_spiffe_id

PIN_ALGORITHMS = {"sha256": 32, "sha384": 48, "sha512": 64}
"""
The digests an SPKI pin may use, with their lengths in bytes.
"""

_SPIFFE = "spiffe://"


class InvalidRule(ValueError):
    """
    An access rule that cannot be used; the message says why, in one line.
    """


def spki_der(certificate: x509.Certificate) -> bytes:
    """
    The DER encoding of the certificate's SubjectPublicKeyInfo.
    """
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def spki_pin(certificate: x509.Certificate, algorithm: str = "sha256") -> str:
    """
    The certificate's SPKI pin, C{ALGO:BASE64} as C{--allow-spki-pin} takes
    it (RFC 7469 section 2.4 hashing).
    """
    digest = hashlib.new(algorithm, spki_der(certificate)).digest()
    return f"{algorithm}:{base64.b64encode(digest).decode()}"


@attrs.frozen
class SpkiPin:
    """
    A hash of a public key: C{ALGO:BASE64} with ALGO sha256, sha384 or
    sha512 over the DER SubjectPublicKeyInfo.
    """

    algorithm: str
    digest: bytes = attrs.field(repr=lambda d: base64.b64encode(d).decode())

    @classmethod
    def parse(cls, text: str) -> SpkiPin:
        """
        Parse C{ALGO:BASE64}.

        @raise InvalidRule: with a one-line explanation.
        """
        algorithm, colon, encoded = text.partition(":")
        algorithm = algorithm.lower()
        if not colon or algorithm not in PIN_ALGORITHMS:
            raise InvalidRule(
                f"{text!r} is not an SPKI pin: write ALGO:BASE64 with ALGO one "
                "of sha256, sha384, sha512"
            )

        try:
            digest = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise InvalidRule(f"{text!r} is not an SPKI pin: bad base64") from None

        if len(digest) != PIN_ALGORITHMS[algorithm]:
            raise InvalidRule(
                f"{text!r} is not an SPKI pin: a {algorithm} digest is "
                f"{PIN_ALGORITHMS[algorithm]} bytes, this one is {len(digest)}"
            )
        return cls(algorithm, digest)

    def __str__(self) -> str:
        return f"{self.algorithm}:{base64.b64encode(self.digest).decode()}"

    def matches(self, certificate: x509.Certificate) -> bool:
        """
        Whether the certificate's public key hashes to this pin.
        """
        digest = hashlib.new(self.algorithm, spki_der(certificate)).digest()
        return hmac.compare_digest(digest, self.digest)


@attrs.frozen
class UriRule:
    """
    An allowed URI SAN: exact text, or for C{spiffe://} URIs a SPIFFE ID
    pattern with C{*} and C{**} path wildcards.
    """

    text: str
    pattern: SpiffeIdPattern | None = attrs.field(default=None, eq=False)

    @classmethod
    def parse(cls, text: str) -> UriRule:
        """
        Parse one C{--allow-uri}/C{--verify-uri} value.

        @raise InvalidRule: with a one-line explanation.
        """
        if not text or any(c.isspace() for c in text) or ":" not in text:
            raise InvalidRule(f"{text!r} is not a URI")

        if not text.startswith(_SPIFFE):
            return cls(text)

        try:
            return cls(text, SpiffeIdPattern.parse(text))
        except InvalidPattern as error:
            raise InvalidRule(str(error)) from None

    def matches(self, uri: str) -> bool:
        """
        Whether the URI SAN C{uri} is allowed by this rule.
        """
        if self.pattern is None:
            return uri == self.text

        try:
            parse_spiffe_id(uri)
        except InvalidSpiffeId:
            return False
        return self.pattern.matches(uri)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidRule(f"{text!r} is not an IP address") from None


@attrs.frozen
class Names:
    """
    The names a certificate carries, as the access rules see them.
    """

    common_names: tuple[str, ...] = ()
    organizational_units: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()

    @classmethod
    def of(cls, certificate: x509.Certificate) -> Names:
        """
        Read the subject and the subject alternative names of C{certificate}.
        """
        subject = certificate.subject
        try:
            san = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            san = None

        def values(oid) -> tuple[str, ...]:
            return tuple(str(a.value) for a in subject.get_attributes_for_oid(oid))

        def sans(kind) -> tuple[str, ...]:
            return tuple(str(v) for v in san.get_values_for_type(kind)) if san else ()

        # A subject may repeat CN; like Go's crypto/x509 (and so ghostunnel)
        # only the last one counts, so a CA-issued "CN=evil,CN=client1" and
        # "CN=client1,CN=evil" are not both taken for client1.
        return cls(
            common_names=values(NameOID.COMMON_NAME)[-1:],
            organizational_units=values(NameOID.ORGANIZATIONAL_UNIT_NAME),
            dns_names=sans(x509.DNSName),
            ip_addresses=sans(x509.IPAddress),
            uris=sans(x509.UniformResourceIdentifier),
        )

    def describe(self) -> str:
        """
        A short name for the peer in log lines: its first URI SAN, else its
        CN, else its first DNS SAN.
        """
        for label, values in (
            ("", self.uris),
            ("CN=", self.common_names),
            ("DNS=", self.dns_names),
            ("IP=", self.ip_addresses),
        ):
            if values:
                return f"{label}{values[0]}"
        return "(no names)"


def _strings(values: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(f"{what} must be a collection of strings, not one string")
    values = tuple(values)
    for value in values:
        if not value:
            raise InvalidRule(f"an empty {what} matches nothing")
    return values


@attrs.frozen
class NameRules:
    """
    Who may connect, by the names in a verified leaf certificate: a peer is
    allowed when any one rule matches (ghostunnel ORs its access flags).

    C{pins} is different in kind: a pinned key authenticates the peer by
    itself, so a L{CertPolicy<ghosttwist.tls.CertPolicy>} with pins skips
    chain verification and judges the leaf by its key only.
    """

    common_names: tuple[str, ...] = attrs.field(
        default=(), converter=lambda v: _strings(v, "CN")
    )
    organizational_units: tuple[str, ...] = attrs.field(
        default=(), converter=lambda v: _strings(v, "OU")
    )
    dns_names: tuple[str, ...] = attrs.field(
        default=(), converter=lambda v: _strings(v, "DNS name")
    )
    ip_addresses: tuple[str, ...] = attrs.field(
        default=(), converter=lambda v: tuple(str(_ip(t)) for t in v)
    )
    uris: tuple[UriRule, ...] = attrs.field(
        default=(),
        converter=lambda v: tuple(
            u if isinstance(u, UriRule) else UriRule.parse(u) for u in v
        ),
    )
    pins: tuple[SpkiPin, ...] = attrs.field(
        default=(),
        converter=lambda v: tuple(
            p if isinstance(p, SpkiPin) else SpkiPin.parse(p) for p in v
        ),
    )

    def __bool__(self) -> bool:
        return any(
            (
                self.common_names,
                self.organizational_units,
                self.dns_names,
                self.ip_addresses,
                self.uris,
                self.pins,
            )
        )

    def check(self, certificate: x509.Certificate) -> Decision:
        """
        Decide whether the peer presenting C{certificate} may connect.
        """
        for pin in self.pins:
            if pin.matches(certificate):
                return Decision(True, f"allowed by SPKI pin {pin}")

        names = Names.of(certificate)
        checks = (
            ("CN", self.common_names, names.common_names),
            ("OU", self.organizational_units, names.organizational_units),
            ("DNS", self.dns_names, names.dns_names),
            ("IP", self.ip_addresses, _normal_ips(names.ip_addresses)),
        )
        for label, allowed, present in checks:
            for value in allowed:
                if value in present:
                    return Decision(True, f"allowed by {label} {value}")

        for rule in self.uris:
            for uri in names.uris:
                if rule.matches(uri):
                    return Decision(True, f"allowed by URI {rule.text}")

        if self.pins:
            return Decision(False, "public key matches no pinned SPKI hash")
        return Decision(False, f"{names.describe()} matches no allowed name")


def _normal_ips(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_address(v)) for v in values)


def check_server_name(certificate: x509.Certificate, name: str) -> str | None:
    """
    Check a server's certificate against the name the client dialed, the
    way a browser does (service-identity: DNS or IP SANs, wildcards in the
    left-most label only, no CN fallback).

    @return: L{None} if it matches, else why not, in one line.
    """
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None

    try:
        if address is not None:
            verify_certificate_ip_address(certificate, str(address))
        else:
            verify_certificate_hostname(certificate, name)
    except VerificationError:
        names = Names.of(certificate)
        listed = ", ".join(names.dns_names + names.ip_addresses) or "none"
        return f"certificate is not valid for {name} (its names: {listed})"
    except CertificateError as error:
        return f"certificate names cannot be checked: {error}"
    return None
