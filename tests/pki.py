"""
Certificates with ordinary names (CN, OU, DNS, IP and URI SANs) written to
disk in the formats a tunnel reads from files: PEM bundles in any order,
split certificate and key, PKCS#12 with or without a password.

Does not support: CRLs, OCSP, or keys other than EC P-256, RSA and Ed25519.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.certs import Issued, _hash_for, new_key

_NOW = datetime.datetime.now(datetime.UTC)


def mint(
    common_name: str,
    *,
    issuer: Issued | None = None,
    ca: bool = False,
    key_type: str = "ec",
    ou: str | None = None,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    not_after: datetime.datetime | None = None,
) -> Issued:
    """
    One certificate valid from an hour ago for a day (or until
    C{not_after}); self-signed when C{issuer} is L{None}.
    """
    key = new_key(key_type)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if ou is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    subject = x509.Name(attributes)
    signer = issuer.key if issuer else key

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(hours=1))
        .not_valid_after(not_after or _NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=False
        )
    return Issued(cert=builder.sign(signer, _hash_for(signer)), key=key)


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def key_pem(key, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def p12(issued: Issued, chain: Sequence[x509.Certificate], password: bytes | None):
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return pkcs12.serialize_key_and_certificates(
        b"tunnel", issued.key, issued.cert, list(chain) or None, encryption
    )


class Pki:
    """
    A root CA, an intermediate, and helpers that write identities it issues
    into C{folder}.
    """

    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.folder = folder
        self.root = mint(f"{name} root", ca=True)
        self.intermediate = mint(f"{name} intermediate", ca=True, issuer=self.root)
        self.cacert = folder / f"{name}-bundle.pem"
        self.cacert.write_bytes(pem(self.root.cert))

    def issue(self, name: str, **kwargs) -> Issued:
        """
        A leaf signed by the intermediate.
        """
        return mint(name, issuer=self.intermediate, **kwargs)

    def keystore(self, issued: Issued, name: str, order: str = "leaf-first") -> Path:
        """
        A PEM keystore: chain and key, in C{order} ("leaf-first" or "odd":
        key, intermediate, leaf).
        """
        path = self.folder / f"{name}.pem"
        if order == "odd":
            data = key_pem(issued.key) + pem(self.intermediate.cert, issued.cert)
        else:
            data = pem(issued.cert, self.intermediate.cert) + key_pem(issued.key)
        path.write_bytes(data)
        return path

    def split(self, issued: Issued, name: str) -> tuple[Path, Path]:
        """
        A PEM chain file and a PEM key file.
        """
        cert, key = self.folder / f"{name}-cert.pem", self.folder / f"{name}-key.pem"
        cert.write_bytes(pem(issued.cert, self.intermediate.cert))
        key.write_bytes(key_pem(issued.key))
        return cert, key

    def pkcs12(self, issued: Issued, name: str, password: bytes | None) -> Path:
        """
        A PKCS#12 keystore holding the leaf, the intermediate and the key.
        """
        path = self.folder / f"{name}.p12"
        path.write_bytes(p12(issued, [self.intermediate.cert], password))
        return path
