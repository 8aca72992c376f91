"""
The dev agent's certificate authority: minting CAs and X509-SVIDs.

Everything here is a pure function of its arguments (the time included), so
the rotation logic and the tests can drive it without a clock of their own.
The certificates follow the X509-SVID specification: one URI SAN holding
the SPIFFE ID, a leaf that is not a CA, and a CA whose keys sign nothing
but certificates and CRLs.
"""

from __future__ import annotations

import datetime

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_SIGNING_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)
SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

#: How far back a new certificate's not-before is set, so that a peer whose
#: clock runs a little behind ours still accepts it.
BACKDATE = datetime.timedelta(seconds=10)

_ORGANIZATION = "ghosttwist dev-agent"


class CAError(ValueError):
    """
    A CA certificate or key that cannot sign SVIDs; the message says why.
    """


@attrs.frozen
class CertificateAuthority:
    """
    A CA certificate and the private key that signs with it.

    C{generated} is false for a CA the operator gave with C{--ca}: such a CA
    is never rotated.
    """

    certificate: x509.Certificate
    private_key: SigningKey = attrs.field(repr=False)
    generated: bool = True

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


@attrs.frozen
class X509Svid:
    """
    An X509-SVID: the SPIFFE ID, the chain (leaf first) and the leaf's key.
    """

    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    private_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    def chain_der(self) -> bytes:
        """
        The chain as the Workload API sends it: DER certificates, concatenated.
        """
        return certificates_der(self.chain)

    def key_der(self) -> bytes:
        """
        The private key as the Workload API sends it: PKCS#8 DER.
        """
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def certificates_der(certificates: tuple[x509.Certificate, ...]) -> bytes:
    """
    Concatenate the DER forms of C{certificates}, the Workload API's encoding
    of both chains and bundles.
    """
    return b"".join(
        certificate.public_bytes(serialization.Encoding.DER)
        for certificate in certificates
    )


def parse_certificates_der(data: bytes) -> list[x509.Certificate]:
    """
    Split concatenated DER certificates (a Workload API chain or bundle).

    @raise ValueError: when C{data} is not a sequence of DER certificates.
    """
    certificates = []
    position = 0
    while position < len(data):
        end = position + _der_length(data, position)
        certificates.append(x509.load_der_x509_certificate(data[position:end]))
        position = end
    return certificates


def _der_length(data: bytes, position: int) -> int:
    if data[position] != 0x30 or position + 2 > len(data):
        raise ValueError("not a DER certificate")

    first = data[position + 1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or position + 2 + count > len(data):
        raise ValueError("unsupported DER length")
    length = int.from_bytes(data[position + 2 : position + 2 + count], "big")
    return 2 + count + length


def mint_ca(
    trust_domain: str, ttl: datetime.timedelta, now: datetime.datetime
) -> CertificateAuthority:
    """
    Make a new self-signed ECDSA P-256 CA for C{trust_domain}, valid from a
    little before C{now} until C{now + ttl}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} dev-agent CA"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, f"{serial:x}"[:16]),
        ]
    )
    public_key = key.public_key()

    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(_whole_seconds(now - BACKDATE))
        .not_valid_after(_whole_seconds(now + ttl))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(_ca_key_usage(), True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
    )
    certificate = builder.sign(key, hashes.SHA256())
    return CertificateAuthority(certificate, key, generated=True)


def mint_svid(
    ca: CertificateAuthority,
    spiffe_id: str,
    ttl: datetime.timedelta,
    now: datetime.datetime,
) -> X509Svid:
    """
    Make a new X509-SVID for C{spiffe_id}, signed by C{ca}.

    Its not-after is C{now + ttl}, clipped to the CA's own not-after: an SVID
    never outlives the CA that vouches for it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    not_after = min(_whole_seconds(now + ttl), ca.not_after)

    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION)])
        )
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_whole_seconds(now - BACKDATE))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_leaf_key_usage(), True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(_authority_key_identifier(ca.certificate), False)
    )
    leaf = builder.sign(ca.private_key, _signature_hash(ca.private_key))
    return X509Svid(spiffe_id, (leaf,), key)


def load_ca(
    certificate_pem: bytes, key_pem: bytes, now: datetime.datetime
) -> CertificateAuthority:
    """
    Check and load an operator's CA (C{--ca}, C{--ca-key}).

    @raise CAError: when the certificate is not a usable CA, has expired, or
        does not belong to the key.
    """
    try:
        certificates = x509.load_pem_x509_certificates(certificate_pem)
    except ValueError:
        raise CAError("no PEM certificate could be read") from None
    if len(certificates) != 1:
        raise CAError(f"expected exactly one CA certificate, found {len(certificates)}")
    certificate = certificates[0]

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CAError("the key is encrypted; give an unencrypted key") from None
    except ValueError:
        raise CAError("no PEM private key could be read") from None
    if not isinstance(key, _SIGNING_KEY_TYPES):
        raise CAError("the key must be an ECDSA, RSA or Ed25519/Ed448 key")

    _check_is_ca(certificate)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CAError("the key does not match the CA certificate")

    if certificate.not_valid_after_utc <= now:
        raise CAError(
            f"the CA certificate expired at {certificate.not_valid_after_utc}"
        )
    return CertificateAuthority(certificate, key, generated=False)


def load_bundle(pem: bytes) -> tuple[x509.Certificate, ...]:
    """
    Read a PEM bundle of CA certificates, as given to C{--federate-with}.

    @raise CAError: when there is no certificate, or one is not a CA.
    """
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CAError("no PEM certificate could be read") from None

    for certificate in certificates:
        _check_is_ca(certificate)
    return tuple(certificates)


def _check_is_ca(certificate: x509.Certificate) -> None:
    subject = certificate.subject.rfc4514_string() or "(empty subject)"
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        raise CAError(f"{subject} has no basicConstraints: not a CA") from None
    if not constraints.ca:
        raise CAError(f"{subject} is not a CA (basicConstraints CA=false)")

    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CAError(f"{subject} may not sign certificates (no keyCertSign)")


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(
    issuer: x509.Certificate,
) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _signature_hash(key: SigningKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _whole_seconds(moment: datetime.datetime) -> datetime.datetime:
    return moment.replace(microsecond=0)
