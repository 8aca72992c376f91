"""
Mint throw-away CAs, intermediates and leaf certificates for tests.

Every knob a test needs to produce a broken SVID is a keyword argument, so
a test table can say in one row which rule it breaks. Nothing here touches
the disk or the network; keys are generated in memory.

Does not support: CRLs, name constraints, or certificate policies.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
"""
The instant most tests authenticate at; certificates are valid around it.
"""

_DAY = datetime.timedelta(days=1)


def new_key(key_type: str = "ec") -> PrivateKey:
    """
    A fresh private key: C{"ec"} (P-256), C{"rsa"} (2048) or C{"ed25519"}.
    """
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())

    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()

    raise ValueError(f"unknown key type {key_type!r}")


@attrs.frozen
class Issued:
    """
    A certificate and the private key that goes with it.
    """

    cert: x509.Certificate
    key: PrivateKey = attrs.field(repr=False)


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None

    return hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(
    common_name: str,
    *,
    issuer: Issued | None = None,
    key_type: str = "ec",
    ca: bool | None = False,
    path_length: int | None = None,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    key_usage: bool = True,
    digital_signature: bool | None = None,
    key_cert_sign: bool | None = None,
    crl_sign: bool | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    sign_with: PrivateKey | None = None,
) -> Issued:
    """
    Mint one certificate.

    @param issuer: who signs it; L{None} for a self-signed root.
    @param ca: the basicConstraints cA flag; L{None} leaves the extension out.
    @param key_usage: whether to include a keyUsage extension at all.
    @param digital_signature: keyUsage bit; defaults to C{not ca}.
    @param key_cert_sign: keyUsage bit; defaults to C{ca}.
    @param crl_sign: keyUsage bit; defaults to C{ca}.
    @param sign_with: sign with this key instead of the issuer's, keeping the
        issuer's name: a forgery.
    """
    key = new_key(key_type)
    is_ca = bool(ca)
    if digital_signature is None:
        digital_signature = not is_ca
    if key_cert_sign is None:
        key_cert_sign = is_ca
    if crl_sign is None:
        crl_sign = is_ca

    issuer_name = issuer.cert.subject if issuer else _name(common_name)
    signing_key = sign_with or (issuer.key if issuer else key)

    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - 30 * _DAY)
        .not_valid_after(not_after or NOW + 30 * _DAY)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
    )

    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.key.public_key()
            ),
            critical=False,
        )

    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None),
            critical=True,
        )

    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )

    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=False
        )

    if not is_ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )

    cert = builder.sign(signing_key, _hash_for(signing_key))
    return Issued(cert=cert, key=key)


def root_ca(common_name: str = "Test Root CA", **kwargs: object) -> Issued:
    """
    A self-signed root CA.
    """
    kwargs.setdefault("ca", True)
    return issue(common_name, **kwargs)  # type: ignore[arg-type]


def intermediate_ca(
    issuer: Issued, common_name: str = "Test Intermediate CA", **kwargs: object
) -> Issued:
    """
    A CA signed by C{issuer}; pass C{ca=False} for a non-CA "intermediate".
    """
    kwargs.setdefault("ca", True)
    return issue(common_name, issuer=issuer, **kwargs)  # type: ignore[arg-type]


def leaf(
    issuer: Issued,
    spiffe_id: str | None = "spiffe://domain.test/workload",
    **kwargs: object,
) -> Issued:
    """
    A leaf SVID for C{spiffe_id} (or with the C{uris} given), signed by
    C{issuer}.
    """
    if "uris" not in kwargs:
        kwargs["uris"] = [spiffe_id] if spiffe_id is not None else []
    return issue("workload", issuer=issuer, **kwargs)  # type: ignore[arg-type]
