"""
Authentication of X509-SVIDs: which SPIFFE ID a TLS peer proved it holds.

The rules are those of the SPIFFE X509-SVID specification. The leaf carries
exactly one URI SAN, a SPIFFE ID with a path; it is not a CA; its key usage
allows digital signatures and forbids signing certificates or CRLs. Every
other certificate in the path is a CA allowed to sign certificates. The
chain must verify against the CAs of the leaf's I{own} trust domain: a CA
trusted for another (federated) trust domain never vouches for this one.

OpenSSL builds the path and checks signatures and validity periods, with a
store that holds one trust domain's CAs only. The SPIFFE rules are checked
here in Python: on what the peer sent before OpenSSL runs, and on the path
OpenSSL built after.
"""

from __future__ import annotations

import datetime
import functools
import types
from collections.abc import Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto
from spiffe import SpiffeId

from ghosttwist.spiffeid import InvalidSpiffeId, parse_spiffe_id

MAX_INTERMEDIATES = 8
"""
The most certificates accepted between the leaf and the trust anchor.
"""

REASONS = (
    "no-certificate",
    "malformed-certificate",
    "chain-too-long",
    "no-spiffe-id",
    "multiple-uri-sans",
    "invalid-spiffe-id",
    "leaf-is-ca",
    "key-usage",
    "intermediate-not-ca",
    "unknown-trust-domain",
    "untrusted-chain",
    "expired",
    "not-yet-valid",
)
"""
Every reason an L{SvidError} may carry: short, stable tokens for logs and
metrics labels.
"""

# OpenSSL verification results (X509_V_ERR_*); their values are part of
# OpenSSL's stable ABI.
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_INVALID_CA = 24
_X509_V_ERR_KEYUSAGE_NO_CERTSIGN = 32

_OPENSSL_REASONS = {
    _X509_V_ERR_CERT_NOT_YET_VALID: "not-yet-valid",
    _X509_V_ERR_CERT_HAS_EXPIRED: "expired",
    _X509_V_ERR_INVALID_CA: "intermediate-not-ca",
    _X509_V_ERR_KEYUSAGE_NO_CERTSIGN: "intermediate-not-ca",
}


class SvidError(Exception):
    """
    A peer's certificate chain is not a valid X509-SVID for any trust domain
    we trust.

    @ivar reason: one of L{REASONS}, for logs and metrics.
    @ivar detail: what exactly was wrong, in words, on one line.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown SVID error reason {reason!r}")

        super().__init__(reason, detail)
        self.reason = reason
        self.detail = _one_line(detail)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId | None:
    """
    The SPIFFE ID in C{cert}'s URI SAN, or L{None} if it has no single valid
    one. For log lines only: this checks nothing about trust.
    """
    try:
        return _leaf_spiffe_id(cert)
    except SvidError:
        return None


def _describe(cert: x509.Certificate) -> str:
    try:
        return repr(cert.subject.rfc4514_string())
    except ValueError:
        return f"serial {cert.serial_number:x}"


def _extension(cert: x509.Certificate, kind: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as e:
        raise SvidError(
            "malformed-certificate",
            f"certificate {_describe(cert)} has unreadable extensions: {e}",
        ) from None


def _leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    san = _extension(leaf, x509.SubjectAlternativeName)
    uris = []
    if isinstance(san, x509.SubjectAlternativeName):
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)

    if not uris:
        raise SvidError("no-spiffe-id", "the leaf certificate has no URI SAN")

    if len(uris) > 1:
        raise SvidError(
            "multiple-uri-sans",
            f"the leaf certificate has {len(uris)} URI SANs; an SVID has one",
        )

    (uri,) = uris
    if not uri[:7].lower() == "spiffe:":
        raise SvidError("no-spiffe-id", f"the leaf's URI SAN {uri!r} is not spiffe://")

    if not (uri.isascii() and uri.isprintable()):
        raise SvidError(
            "invalid-spiffe-id", f"the leaf's URI SAN {uri!r} has control characters"
        )

    try:
        spiffe_id = parse_spiffe_id(uri)
    except InvalidSpiffeId as e:
        raise SvidError("invalid-spiffe-id", str(e)) from None

    if not spiffe_id.path:
        raise SvidError(
            "invalid-spiffe-id",
            f"{uri!r} names a trust domain, not a workload: a leaf SVID's "
            "SPIFFE ID must have a path",
        )

    return spiffe_id


def _check_leaf(leaf: x509.Certificate) -> None:
    constraints = _extension(leaf, x509.BasicConstraints)
    if isinstance(constraints, x509.BasicConstraints) and constraints.ca:
        raise SvidError("leaf-is-ca", "the leaf certificate is a CA certificate")

    usage = _extension(leaf, x509.KeyUsage)
    if not isinstance(usage, x509.KeyUsage):
        raise SvidError("key-usage", "the leaf certificate has no keyUsage")

    if not usage.digital_signature:
        raise SvidError("key-usage", "the leaf's keyUsage lacks digitalSignature")

    if usage.key_cert_sign or usage.crl_sign:
        raise SvidError(
            "key-usage", "the leaf's keyUsage allows keyCertSign or cRLSign"
        )


def _check_signing_certificate(cert: x509.Certificate) -> None:
    constraints = _extension(cert, x509.BasicConstraints)
    if not (isinstance(constraints, x509.BasicConstraints) and constraints.ca):
        raise SvidError(
            "intermediate-not-ca",
            f"intermediate {_describe(cert)} is not a CA certificate",
        )

    usage = _extension(cert, x509.KeyUsage)
    if not (isinstance(usage, x509.KeyUsage) and usage.key_cert_sign):
        raise SvidError(
            "intermediate-not-ca",
            f"intermediate {_describe(cert)} may not sign certificates "
            "(no keyCertSign)",
        )


class _Verdicts:
    """
    The outcome of one of the SPIFFE rule checks above for the certificates
    seen lately, by their DER encoding: a peer presents the same leaf and
    intermediates on every connection, and parsing their extensions again
    each time is most of what authentication costs in Python.

    The checks are pure functions of the certificate's content, so an
    outcome is valid for as long as the bytes are the same; what depends on
    the time or the bundles (validity, the chain, the trust domain's
    bundle) is never remembered here. Holds at most C{size} certificates,
    forgetting the oldest first, so a peer presenting ever new ones only
    costs the checks, not memory.
    """

    def __init__(self, check, size: int = 256) -> None:
        self._check = check
        self._size = size
        self._outcomes: dict[bytes, tuple[bool, object]] = {}

    def __call__(self, cert: x509.Certificate):
        """
        What C{check(cert)} returns, or raise the L{SvidError} it raises.
        """
        key = cert.public_bytes(Encoding.DER)
        outcome = self._outcomes.get(key)
        if outcome is None:
            try:
                outcome = (True, self._check(cert))
            except SvidError as error:
                outcome = (False, (error.reason, error.detail))
            if len(self._outcomes) >= self._size:
                del self._outcomes[next(iter(self._outcomes))]
            self._outcomes[key] = outcome

        passed, value = outcome
        if not passed:
            raise SvidError(*value)
        return value


def _leaf_rules(leaf: x509.Certificate) -> SpiffeId:
    spiffe_id = _leaf_spiffe_id(leaf)
    _check_leaf(leaf)
    return spiffe_id


_checked_leaf = _Verdicts(_leaf_rules)
_checked_signing_certificate = _Verdicts(_check_signing_certificate)


def _to_openssl(cert: x509.Certificate) -> crypto.X509:
    return crypto.X509.from_cryptography(cert)


def _new_store(
    anchors: Sequence[crypto.X509], now: datetime.datetime | None
) -> crypto.X509Store:
    store = crypto.X509Store()
    for anchor in anchors:
        store.add_cert(anchor)

    if now is not None:
        # set_time replaces the store's parameters, so it comes before the
        # flags. It reads the time tuple as UTC: convert first.
        if now.tzinfo is not None:
            now = now.astimezone(datetime.timezone.utc)
        store.set_time(now)

    # A bundle lists CAs to trust, roots or not: each is an anchor.
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    return store


def _is_trust_domain_name(name: str) -> bool:
    if not (name.isascii() and name.isprintable()):
        return False

    try:
        return not parse_spiffe_id(f"spiffe://{name}").path
    except InvalidSpiffeId:
        return False


def _freeze_bundles(
    bundles: Mapping[str, Sequence[x509.Certificate]],
) -> Mapping[str, tuple[x509.Certificate, ...]]:
    frozen = {}
    for name, certs in bundles.items():
        name = str(name)
        if not _is_trust_domain_name(name):
            raise ValueError(f"bundle key {name!r} is not a trust domain name")

        certs = tuple(certs)
        for cert in certs:
            if not isinstance(cert, x509.Certificate):
                raise TypeError(f"bundle {name!r} holds {cert!r}, not a certificate")
        frozen[name] = certs

    return types.MappingProxyType(frozen)


@attrs.frozen(repr=False, eq=False)
class BundleVerifier:
    """
    Authenticates X509-SVID chains against one snapshot of the trust bundles.

    Build one per bundle update and share it: it holds a ready OpenSSL store
    per trust domain, and nothing in it changes after construction.

    @ivar bundles: trust domain name (C{"example.org"}) to its CAs.
    """

    bundles: Mapping[str, tuple[x509.Certificate, ...]] = attrs.field(
        converter=_freeze_bundles
    )
    _anchors: Mapping[str, tuple[crypto.X509, ...]] = attrs.field(init=False)
    _stores: Mapping[str, crypto.X509Store] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        anchors = {
            name: tuple(_to_openssl(c) for c in certs)
            for name, certs in self.bundles.items()
        }
        stores = {name: _new_store(certs, None) for name, certs in anchors.items()}
        object.__setattr__(self, "_anchors", types.MappingProxyType(anchors))
        object.__setattr__(self, "_stores", types.MappingProxyType(stores))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {len(c)} CAs" for n, c in sorted(self.bundles.items()))
        return f"<BundleVerifier {{{sizes}}}>"

    def authenticate(
        self,
        chain: Sequence[x509.Certificate],
        now: datetime.datetime | None = None,
    ) -> SpiffeId:
        """
        Check that C{chain} is a valid X509-SVID, and say whose.

        @param chain: the peer's certificates, leaf first, then whatever
            intermediates (and perhaps a root) it sent.
        @param now: the instant to check validity at; the current time if
            L{None}. A naive datetime is taken as UTC.

        @return: the leaf's SPIFFE ID.
        @raise SvidError: saying why the chain is refused.
        """
        spiffe_id, trust_domain = self._check_rules(chain)
        self._verify_path(spiffe_id, trust_domain, chain[0], chain[1:], now)
        return spiffe_id

    def authenticate_verified_path(self, path: Sequence[x509.Certificate]) -> SpiffeId:
        """
        Like L{authenticate}, for a C{path} (leaf first, trust anchor last)
        that OpenSSL has just built and verified, at the current time,
        against a store holding exactly this verifier's CAs.

        When this verifier holds one trust domain, that store I{is} the
        peer's own trust domain's store, and verifying the path again would
        repeat the same signature and validity checks: only the SPIFFE
        rules are checked. With several trust domains the store OpenSSL
        used binds no CA to its domain, so the path is verified again
        against the peer's own domain, as L{authenticate} does.

        @raise SvidError: saying why the chain is refused.
        """
        if len(self._stores) != 1:
            return self.authenticate(path)
        spiffe_id, _ = self._check_rules(path)
        _check_path_shape(spiffe_id, len(path), path[1:-1])
        return spiffe_id

    def authenticate_leaf(self, leaf: x509.Certificate) -> SpiffeId:
        """
        The SPIFFE ID of a C{leaf} whose chain was verified earlier against
        these same bundles (the peer of a resumed TLS session): the SPIFFE
        rules on the leaf, and its trust domain one of these bundles'.

        @raise SvidError: saying why the leaf is refused.
        """
        spiffe_id, _ = self._check_rules([leaf])
        return spiffe_id

    def _check_rules(self, chain: Sequence[x509.Certificate]) -> tuple[SpiffeId, str]:
        """
        The SPIFFE rules on what the peer sent, and its trust domain.
        """
        if not chain:
            raise SvidError("no-certificate", "the peer sent no certificate")

        # Room for the intermediates and the root a peer may add; the path
        # OpenSSL builds is held to MAX_INTERMEDIATES exactly, below.
        if len(chain) - 1 > MAX_INTERMEDIATES + 1:
            raise SvidError(
                "chain-too-long",
                f"the peer sent {len(chain) - 1} certificates after the leaf; "
                f"at most {MAX_INTERMEDIATES} intermediates and a root are "
                "accepted",
            )

        spiffe_id = _checked_leaf(chain[0])
        for cert in chain[1:]:
            _checked_signing_certificate(cert)

        trust_domain = str(spiffe_id.trust_domain)
        if trust_domain not in self._stores:
            raise SvidError(
                "unknown-trust-domain",
                f"{spiffe_id} is in trust domain {trust_domain!r}, "
                "for which we have no bundle",
            )
        return spiffe_id, trust_domain

    def _verify_path(
        self,
        spiffe_id: SpiffeId,
        trust_domain: str,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        now: datetime.datetime | None,
    ) -> None:
        if now is None:
            store = self._stores[trust_domain]
        else:
            store = _new_store(self._anchors[trust_domain], now)

        context = crypto.X509StoreContext(
            store,
            _to_openssl(leaf),
            chain=[_to_openssl(c) for c in intermediates] or None,
        )
        try:
            path = context.get_verified_chain()
        except crypto.X509StoreContextError as e:
            code, depth, message = e.errors
            reason = _OPENSSL_REASONS.get(code, "untrusted-chain")
            subject = _describe(e.certificate.to_cryptography())
            raise SvidError(
                reason,
                f"{spiffe_id} does not verify against the {trust_domain!r} "
                f"bundle: {message} (certificate {subject}, depth {depth})",
            ) from None
        except crypto.Error as e:
            raise SvidError(
                "untrusted-chain", f"{spiffe_id}: OpenSSL could not verify: {e}"
            ) from None

        _check_path_shape(
            spiffe_id, len(path), [cert.to_cryptography() for cert in path[1:-1]]
        )


def _check_path_shape(
    spiffe_id: SpiffeId, length: int, middle: Sequence[x509.Certificate]
) -> None:
    """
    The rules on a verified path: the leaf is issued by a CA, through at
    most L{MAX_INTERMEDIATES} intermediates, each allowed to sign.
    """
    if length < 2:
        raise SvidError(
            "untrusted-chain",
            f"{spiffe_id}: the leaf is itself in the bundle; a leaf SVID "
            "must be issued by a CA",
        )

    if length - 2 > MAX_INTERMEDIATES:
        raise SvidError(
            "chain-too-long",
            f"{spiffe_id} verifies only through {length - 2} "
            f"intermediates; at most {MAX_INTERMEDIATES} are accepted",
        )

    for cert in middle:
        _checked_signing_certificate(cert)


def authenticate(
    chain: Sequence[x509.Certificate],
    bundles: Mapping[str, Sequence[x509.Certificate]],
    now: datetime.datetime | None = None,
) -> SpiffeId:
    """
    Check that C{chain} is a valid X509-SVID under C{bundles}, and say whose.

    A convenience over L{BundleVerifier}; verifiers for recently seen bundles
    are cached, so repeated calls with the same bundles are cheap. Code that
    gets bundle updates should build a L{BundleVerifier} per update instead.

    @raise SvidError: saying why the chain is refused.
    """
    items = ((str(name), tuple(certs)) for name, certs in bundles.items())
    key = tuple(sorted(items, key=lambda item: item[0]))
    return _cached_verifier(key).authenticate(chain, now)


@functools.lru_cache(maxsize=16)
def _cached_verifier(
    key: tuple[tuple[str, tuple[x509.Certificate, ...]], ...],
) -> BundleVerifier:
    return BundleVerifier(dict(key))
