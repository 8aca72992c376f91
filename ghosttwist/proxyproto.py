"""
PROXY protocol version 2 headers, sent to the target ahead of a tunnelled
connection's first byte (server mode's C{--proxy-protocol-mode}).

Three modes, as ghostunnel has them:

  - C{conn}: the client's address and the address it connected to.
  - C{tls}: also C{PP2_TYPE_ALPN}, C{PP2_TYPE_AUTHORITY} (the SNI name)
    and C{PP2_TYPE_SSL} with the TLS version and cipher.
  - C{tls-full}: also the client certificate's common name and the
    certificate itself (DER) inside C{PP2_TYPE_SSL}.

In every mode a verified peer's SPIFFE ID travels in a TLV of our own,
L{PP2_TYPE_SPIFFE_ID}, so a backend can authorize without parsing
certificates. Receivers ignore TLV types they do not know, as the
specification requires of them.
"""

from __future__ import annotations

import ipaddress
import struct

from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

PP2_VERSION_PROXY = 0x21

PP2_FAMILY_UNSPEC = 0x00
PP2_FAMILY_TCP4 = 0x11
PP2_FAMILY_TCP6 = 0x21
PP2_FAMILY_UNIX = 0x31

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_CLIENT_CERT = 0x28
"""The client certificate, DER; the subtype ghostunnel uses for it."""

PP2_TYPE_SPIFFE_ID = 0xE0
"""
ghosttwist's own TLV, from the range the specification leaves to
applications (0xE0-0xEF): the verified peer's SPIFFE ID, as UTF-8.
Present only when the peer proved one.
"""

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

MODES = ("conn", "tls", "tls-full")


def tlv(kind: int, value: bytes) -> bytes:
    """
    One type-length-value record.
    """
    return struct.pack("!BH", kind, len(value)) + value


def addresses(source, destination) -> tuple[int, bytes]:
    """
    The family byte and address block for a connection from C{source} to
    C{destination} (Twisted addresses). Two IP addresses of different
    families are both written as IPv6; anything else unknown is
    C{UNSPEC} with no addresses.
    """
    ip_types = (IPv4Address, IPv6Address)
    if isinstance(source, ip_types) and isinstance(destination, ip_types):
        src, dst = _ip(source.host), _ip(destination.host)
        if src.version == dst.version == 4:
            block = src.packed + dst.packed
            return PP2_FAMILY_TCP4, block + struct.pack(
                "!HH", source.port, destination.port
            )
        src, dst = _as_v6(src), _as_v6(dst)
        block = src.packed + dst.packed
        return PP2_FAMILY_TCP6, block + struct.pack(
            "!HH", source.port, destination.port
        )

    if isinstance(source, UNIXAddress) and isinstance(destination, UNIXAddress):
        return PP2_FAMILY_UNIX, _unix_path(source.name) + _unix_path(destination.name)

    return PP2_FAMILY_UNSPEC, b""


def _ip(host: str):
    return ipaddress.ip_address(host.split("%", 1)[0])


def _as_v6(address) -> ipaddress.IPv6Address:
    if address.version == 6:
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


def _unix_path(name) -> bytes:
    if name is None:
        name = b""
    if isinstance(name, str):
        name = name.encode()
    return name[:108].ljust(108, b"\x00")


def tls_tlvs(connection, mode: str, verified: bool) -> bytes:
    """
    The TLVs C{tls} and C{tls-full} add, read from a pyOpenSSL connection
    whose handshake has completed.
    """
    records = b""
    alpn = connection.get_alpn_proto_negotiated()
    if alpn:
        records += tlv(PP2_TYPE_ALPN, alpn)
    server_name = connection.get_servername()
    if server_name:
        records += tlv(PP2_TYPE_AUTHORITY, server_name)

    certificate = connection.get_peer_certificate()
    flags = PP2_CLIENT_SSL
    if certificate is not None:
        # A certificate was verified on this connection, and belongs to its
        # session (a resumed session keeps the certificate it was born with).
        flags |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    verify = 0 if certificate is not None and verified else 1

    subs = tlv(PP2_SUBTYPE_SSL_VERSION, connection.get_protocol_version_name().encode())
    cipher = connection.get_cipher_name()
    if cipher:
        subs += tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.encode())
    if mode == "tls-full" and certificate is not None:
        # The last CN, as the access rules read it (certnames.Names).
        common_names = certificate.to_cryptography().subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
        common_name = str(common_names[-1].value) if common_names else ""
        if common_name:
            subs += tlv(PP2_SUBTYPE_SSL_CN, common_name.encode())
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
        subs += tlv(PP2_SUBTYPE_SSL_CLIENT_CERT, der)

    return records + tlv(PP2_TYPE_SSL, struct.pack("!BI", flags, verify) + subs)


def header(
    mode: str,
    source,
    destination,
    *,
    connection=None,
    spiffe_id: str | None = None,
) -> bytes:
    """
    A complete PROXY v2 header for one connection.

    @param connection: the pyOpenSSL connection, for the C{tls} modes.
    @param spiffe_id: the peer's verified SPIFFE ID, or L{None}.
    """
    family, block = addresses(source, destination)
    records = b""
    if mode in ("tls", "tls-full") and connection is not None:
        # The tunnel reaches this point only after its own verification has
        # accepted whatever certificate the peer presented (SPIFFE rules,
        # name rules or a pin), so a certificate here is a verified one.
        records += tls_tlvs(connection, mode, verified=True)
    if spiffe_id:
        records += tlv(PP2_TYPE_SPIFFE_ID, spiffe_id.encode())

    body = block + records
    return SIGNATURE + struct.pack("!BBH", PP2_VERSION_PROXY, family, len(body)) + body


def parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """
    Split a run of TLV records, as a receiver does after the addresses.

    @raise ValueError: if a record runs past the end.
    """
    records = []
    while data:
        if len(data) < 3:
            raise ValueError("truncated TLV")
        kind, length = struct.unpack("!BH", data[:3])
        if len(data) < 3 + length:
            raise ValueError("truncated TLV")
        records.append((kind, data[3 : 3 + length]))
        data = data[3 + length :]
    return records


ADDRESS_SIZES = {
    PP2_FAMILY_UNSPEC: 0,
    PP2_FAMILY_TCP4: 12,
    PP2_FAMILY_TCP6: 36,
    PP2_FAMILY_UNIX: 216,
}


def header_for(mode: str, transport, spiffe_id: str | None) -> bytes:
    """
    The header for the connection accepted on C{transport} (a TLS
    transport whose handshake has completed).
    """
    connection = transport.getHandle() if mode != "conn" else None
    return header(
        mode,
        transport.getPeer(),
        transport.getHost(),
        connection=connection,
        spiffe_id=spiffe_id,
    )
