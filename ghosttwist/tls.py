"""
TLS contexts built from an L{Identity}, and the connection creators that
hand each new connection the context current at its birth.

A pyOpenSSL C{Context} is never changed once a handshake may use it: each
identity update builds a new one and swaps the reference, so connections
already open keep the context they were born with.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import secrets
import time
from collections.abc import Callable

import attrs
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from ghosttwist.auth.certnames import NameRules, Names, check_server_name
from ghosttwist.auth.policy import Authorizer, Decision
from ghosttwist.auth.svid import BundleVerifier, SvidError, spiffe_id_of
from ghosttwist.identity import Identity

log = Logger()

# Forward secrecy and AEAD only; TLS 1.3 suites are OpenSSL's defaults.
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

MAX_CHAIN_DEPTH = 8

# The longest a session ticket stays good; never longer than the
# certificate the context presents.
MAX_TICKET_LIFETIME = 3600

# Sessions a client keeps for its next connections. Each is offered once
# (a TLS 1.3 ticket serves one resumption), so the pool is as deep as the
# connections a client opens at once; each connection brings a new one.
MAX_KEPT_SESSIONS = 64

_OPENSSL_TEXT = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate not in any bundle",
    19: "self-signed certificate in chain not in any bundle",
    20: "issuer not in any trust bundle",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    24: "invalid CA certificate in chain",
    26: "unsupported certificate purpose",
    37: "a certificate with CA markings used as a leaf",
    79: "invalid CA certificate in chain",
}

# OpenSSL verification errors, mapped to the refusal reasons the tunnel logs.
_OPENSSL_REASONS = {
    9: "not-yet-valid",
    10: "expired",
    2: "untrusted-chain",
    18: "untrusted-chain",
    19: "untrusted-chain",
    20: "untrusted-chain",
    21: "untrusted-chain",
    7: "untrusted-chain",
    22: "chain-too-long",
    24: "intermediate-not-ca",
    26: "key-usage",
    37: "leaf-is-ca",
    79: "intermediate-not-ca",
}


# SPIFFE rules about the leaf itself, as opposed to its chain.
_LEAF_REASONS = frozenset(
    {
        "no-spiffe-id",
        "multiple-uri-sans",
        "invalid-spiffe-id",
        "leaf-is-ca",
        "key-usage",
        "malformed-certificate",
    }
)


def _refuse_from_openssl(state: HandshakeState, errno: int) -> None:
    state.refusal = _OPENSSL_REASONS.get(errno, "untrusted-chain")
    state.detail = _OPENSSL_TEXT.get(errno, f"OpenSSL verify error {errno}")


@attrs.define
class HandshakeState:
    """
    What verification learned about the peer of one connection; hung on the
    TLS transport (Twisted makes that the pyOpenSSL connection's app data) so
    the verify callback can fill it in and the proxy can log it.
    """

    chain: dict[int, crypto.X509] = attrs.field(factory=dict)
    # Whether the verify callback judged the peer's leaf in this handshake;
    # a resumed session skips it and is judged again when it completes.
    verified: bool = False
    resumed: bool = False
    # Client side: called once with the connection when a session worth
    # offering next time may have arrived.
    keep_session: Callable[[SSL.Connection], None] | None = None
    # The context's L{ChainHorizon}, set when the connection is created.
    horizon: ChainHorizon | None = None
    peer_id: str | None = None
    # With identities from files: the peer's name for log lines (its first
    # URI SAN, CN...); peer_id then holds only a SPIFFE ID from its leaf.
    peer_name: str = ""
    refusal: str | None = None
    detail: str = ""
    decision: str = ""


class ChainHorizon:
    """
    When the first CA certificate ends that a session of one context may
    lean on, among those that end before the leaf they vouch for.

    A session keeps its peer's leaf but not the chain above it, so judging
    a resumed session by its leaf alone would let in a peer whose
    intermediate or root has expired since. Each verified chain whose CA
    ends before its leaf lowers the horizon; once it has passed, no session
    of that context may resume, and L{ContextHolder} builds a new context
    (new ticket key) so that peers make a full handshake instead.
    """

    def __init__(self) -> None:
        self.ends = math.inf

    def note(self, chain: dict[int, crypto.X509]) -> None:
        """
        Take in the verified path of a full handshake (by depth, 0 the leaf).
        """
        if len(chain) < 2:
            return
        ends = {depth: _not_after(cert) for depth, cert in chain.items()}
        leaf = ends.pop(0, math.inf)
        first = min(ends.values())
        if first < leaf:
            self.ends = min(self.ends, first)

    def passed(self) -> bool:
        """
        Whether a CA certificate some session may lean on has expired.
        """
        return time.time() >= self.ends


def _not_after(certificate: crypto.X509) -> float:
    return certificate.to_cryptography().not_valid_after_utc.timestamp()


@attrs.frozen
class PeerPolicy:
    """
    How one context judges its peer: authentication against the bundles,
    then authorization of the SPIFFE ID it proved.
    """

    verifier: BundleVerifier
    authorizer: Authorizer
    # Set by build_context when the context's OpenSSL store holds exactly
    # the verifier's CAs: the chain OpenSSL verified is then not verified
    # again when that is one trust domain (see authenticate_verified_path).
    store_is_verifiers: bool = False

    def verify(self, connection, certificate, errno, depth, ok) -> bool:
        """
        pyOpenSSL's verification callback: OpenSSL checks the chain against
        every bundle at once, then the SPIFFE rules and the peer's own trust
        domain are checked here, at depth 0, before the handshake ends.
        """
        state: HandshakeState = connection.get_app_data().handshake
        state.chain[depth] = certificate

        if not ok:
            _refuse_from_openssl(state, errno)
            if depth == 0:
                self._name_leaf_defect(state)
            return False

        if depth > 0:
            return True

        state.verified = True
        return self._verify_leaf(state)

    def judge_resumed(self, state: HandshakeState, leaf: crypto.X509 | None) -> bool:
        """
        Judge the peer of a resumed session, which skipped the verify
        callback: its leaf (kept in the session) must still be within its
        validity, meet the SPIFFE leaf rules, belong to a trust domain this
        context trusts, and be allowed by the authorizer.

        The chain needs no second look: a session resumes only on the
        context that verified it (see L{build_context}), so against the
        same bundles.
        """
        certificate = _resumed_leaf(state, leaf)
        if certificate is None:
            return False

        state.chain[0] = leaf
        if not self._admit(state, self.verifier.authenticate_leaf, certificate):
            return False
        return _mark_resumed(state)

    def _name_leaf_defect(self, state: HandshakeState) -> None:
        """
        When OpenSSL refuses the leaf, a SPIFFE rule it breaks (a CA as
        leaf, two URI SANs, missing key usage) names the refusal better
        than OpenSSL's generic error does.
        """
        try:
            self.verifier.authenticate([state.chain[0].to_cryptography()])
        except SvidError as error:
            if error.reason in _LEAF_REASONS:
                state.refusal = error.reason
                state.detail = error.detail

    def _verify_leaf(self, state: HandshakeState) -> bool:
        chain = [state.chain[depth].to_cryptography() for depth in sorted(state.chain)]
        if self.store_is_verifiers:
            return self._admit(state, self.verifier.authenticate_verified_path, chain)
        return self._admit(state, self.verifier.authenticate, chain)

    def _admit(self, state: HandshakeState, authenticate, certificates) -> bool:
        """
        Authenticate the peer from C{certificates}, then authorize the
        SPIFFE ID it proved; record the outcome on C{state}.
        """
        try:
            spiffe_id = authenticate(certificates)
        except SvidError as error:
            state.refusal = error.reason
            state.detail = error.detail
            return False

        state.peer_id = str(spiffe_id)
        decision = self.authorizer.check(spiffe_id)
        state.decision = decision.reason
        if not decision.allowed:
            state.refusal = "unauthorized"
            state.detail = decision.reason
            return False

        return True


@attrs.frozen
class CertPolicy:
    """
    How one context judges its peer when identities come from files:
    OpenSSL verifies the chain against the CA bundle, then the leaf must
    carry the name the client dialed (client mode, C{server_name}) and meet
    one of the access rules, or the Rego policy.

    With SPKI pins in C{rules} the pin alone authenticates: chain, validity
    and names are not checked, only the leaf's public key.
    """

    rules: NameRules = attrs.field(factory=NameRules)
    allow_all: bool = False
    server_name: str | None = None
    rego: object | None = None

    def verify(self, connection, certificate, errno, depth, ok) -> bool:
        """
        pyOpenSSL's verification callback; refusing here fails the handshake
        with an alert, before any byte reaches the target.
        """
        state: HandshakeState = connection.get_app_data().handshake

        if self.rules.pins:
            if depth > 0:
                return True
            state.verified = True
            return self._verify_pin(state, certificate.to_cryptography())

        if not ok:
            _refuse_from_openssl(state, errno)
            return False

        state.chain[depth] = certificate
        if depth > 0:
            return True

        state.verified = True
        return self._verify_leaf(state)

    def judge_resumed(self, state: HandshakeState, leaf: crypto.X509 | None) -> bool:
        """
        Judge the peer of a resumed session again by its leaf, kept in the
        session: a pin, or the leaf's validity, name and access rules.
        (Contexts with a Rego policy, which may look at the whole chain,
        issue no tickets.)
        """
        if self.rules.pins:
            if leaf is None:
                return _refuse_resumed(state, "no-certificate", "no certificate")
            allowed = self._verify_pin(state, leaf.to_cryptography())
        else:
            if _resumed_leaf(state, leaf) is None:
                return False
            state.chain[0] = leaf
            allowed = self._verify_leaf(state)
        return allowed and _mark_resumed(state)

    def _verify_pin(self, state: HandshakeState, leaf) -> bool:
        # No CA vouches for the names in a pinned certificate: none of them,
        # a SPIFFE ID included, is passed on as verified.
        state.peer_name = Names.of(leaf).describe()
        return self._judge(state, self.rules.check(leaf))

    def _verify_leaf(self, state: HandshakeState) -> bool:
        chain = [state.chain[depth].to_cryptography() for depth in sorted(state.chain)]
        leaf = chain[0]
        _name_peer(state, leaf)

        if self.server_name is not None:
            problem = check_server_name(leaf, self.server_name)
            if problem is not None:
                state.refusal = "hostname-mismatch"
                state.detail = problem
                return False

        if self.allow_all or not (self.rules or self.rego):
            why = "allow-all" if self.allow_all else f"valid for {self.server_name}"
            return self._judge(state, Decision(True, why))

        reasons = []
        if self.rules:
            decision = self.rules.check(leaf)
            if decision.allowed:
                return self._judge(state, decision)
            reasons.append(decision.reason)
        if self.rego is not None:
            outcome = self.rego.evaluate(chain)
            if outcome.allowed:
                return self._judge(state, Decision(True, outcome.reason))
            reasons.append(outcome.reason)
        return self._judge(state, Decision(False, "; ".join(reasons)))

    def _judge(self, state: HandshakeState, decision: Decision) -> bool:
        state.decision = decision.reason
        if not decision.allowed:
            state.refusal = "unauthorized"
            state.detail = decision.reason
        return decision.allowed


def _mark_resumed(state: HandshakeState) -> bool:
    state.resumed = True
    state.decision += ", session resumed"
    return True


def _refuse_resumed(state: HandshakeState, reason: str, detail: str) -> bool:
    state.refusal = reason
    state.detail = f"resumed session: {detail}"
    return False


def _resumed_leaf(state: HandshakeState, leaf: crypto.X509 | None):
    """
    The leaf a resumed session was made with, as a C{cryptography}
    certificate, if it is still within its validity; else L{None}, with
    the refusal recorded on C{state}.
    """
    if leaf is None:
        _refuse_resumed(state, "no-certificate", "the session holds no certificate")
        return None

    certificate = leaf.to_cryptography()
    now = datetime.datetime.now(datetime.UTC)
    if now > certificate.not_valid_after_utc:
        _refuse_resumed(state, "expired", "the peer's certificate has expired")
        return None
    if now < certificate.not_valid_before_utc:
        _refuse_resumed(state, "not-yet-valid", "the peer's certificate is not yet valid")
        return None
    return certificate


def _name_peer(state: HandshakeState, leaf) -> None:
    spiffe_id = spiffe_id_of(leaf)
    state.peer_id = str(spiffe_id) if spiffe_id else None
    state.peer_name = Names.of(leaf).describe()


_TLS_VERSIONS = {"TLS1.2": SSL.TLS1_2_VERSION, "TLS1.3": SSL.TLS1_3_VERSION}


def build_context(
    identity: Identity,
    *,
    server: bool,
    policy: PeerPolicy | CertPolicy | None,
    max_tls_version: str = "TLS1.3",
    alpn: tuple[str, ...] = (),
) -> SSL.Context:
    """
    Build a fresh context that presents C{identity} and verifies peers with
    C{policy}; L{None} for C{policy} means no peer certificate is asked for.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(_TLS_VERSIONS[max_tls_version])
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    context.set_cipher_list(CIPHERS)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # The policy judges resumed sessions (HalfCloseTLSProtocol asks it).
    context.set_app_data(policy)
    _resume_here_only(context, identity, policy)

    if identity.chain:
        _present(context, identity)

    if alpn:
        _negotiate(context, alpn, server)

    if policy is None:
        context.set_verify(SSL.VERIFY_NONE)
        return context

    store = context.get_cert_store()
    for cas in identity.bundles.values():
        for ca in cas:
            store.add_cert(crypto.X509.from_cryptography(ca))

    if isinstance(policy, PeerPolicy) and _same_cas(identity, policy.verifier):
        policy = attrs.evolve(policy, store_is_verifiers=True)

    mode = SSL.VERIFY_PEER
    if server:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(mode, policy.verify)
    context.set_verify_depth(MAX_CHAIN_DEPTH)
    return context


def _resume_here_only(
    context: SSL.Context, identity: Identity, policy: PeerPolicy | CertPolicy | None
) -> None:
    """
    Let peers resume sessions (stateless tickets) made with this context,
    and with no other.

    OpenSSL gives every context its own random ticket key, and the random
    session ID context refuses sessions of any other context too. Every
    change of identity, bundle or policy builds a new context, so it
    invalidates every ticket issued before it. A resumed session skips the
    verify callback; the policy's C{judge_resumed} judges it instead, when
    the handshake completes. A Rego policy may look at the whole chain,
    which a session does not keep: with one, no tickets are issued.
    """
    if isinstance(policy, CertPolicy) and policy.rego is not None:
        context.set_options(SSL.OP_NO_TICKET)
        return

    context.set_session_id(secrets.token_bytes(32))
    context.set_timeout(_ticket_lifetime(identity))


def _ticket_lifetime(identity: Identity) -> int:
    """
    Seconds a session ticket stays good: at most L{MAX_TICKET_LIFETIME},
    and never past the end of the certificate this context presents.
    """
    if not identity.chain:
        return MAX_TICKET_LIFETIME
    ends = identity.chain[0].not_valid_after_utc
    left = (ends - datetime.datetime.now(datetime.UTC)).total_seconds()
    return max(1, min(MAX_TICKET_LIFETIME, int(left)))


def _same_cas(identity: Identity, verifier: BundleVerifier) -> bool:
    """
    Whether the store filled from C{identity}'s bundles holds exactly the
    CAs of C{verifier}.
    """
    ours = {str(name): tuple(cas) for name, cas in identity.bundles.items()}
    return ours == dict(verifier.bundles)


def _negotiate(context: SSL.Context, alpn: tuple[str, ...], server: bool) -> None:
    """
    Offer C{alpn} (client), or pick the first of C{alpn} the client offers
    and refuse a client that offers ALPN but none of them (server, RFC 7301
    no_application_protocol).
    """
    ours = [protocol.encode() for protocol in alpn]
    if not server:
        context.set_alpn_protos(ours)
        return

    def select(connection, offered):
        for protocol in ours:
            if protocol in offered:
                return protocol

        state = getattr(connection.get_app_data(), "handshake", None)
        if state is not None:
            state.refusal = "alpn"
            state.detail = "the client offers none of " + ",".join(alpn)
        # An error here makes OpenSSL end the handshake with the
        # no_application_protocol alert.
        raise SSL.Error([("SSL routines", "alpn", "no application protocol")])

    context.set_alpn_select_callback(select)


def _present(context: SSL.Context, identity: Identity) -> None:
    leaf, *intermediates = identity.chain
    context.use_certificate(leaf)
    for certificate in intermediates:
        context.add_extra_chain_cert(certificate)
    context.use_privatekey(identity.key)
    context.check_privatekey()


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class ContextHolder:
    """
    The current context, swapped whole on each identity update; each new
    connection is created from whatever context is current at that moment.

    As a client it also keeps the sessions its server issued under the
    current context, and offers each once, on a later connection, so that
    most connections resume instead of making a full handshake. A new
    context forgets them.
    """

    def __init__(self, build: Callable[[Identity], SSL.Context]) -> None:
        self._build = build
        self.context: SSL.Context | None = None
        self.identity: Identity | None = None
        self.server_name: str | None = None
        self.horizon = ChainHorizon()
        self._sessions: list[SSL.Session] = []

    def update(self, identity: Identity) -> None:
        """
        Build a context for C{identity} and make it current.

        A context that cannot be built leaves the previous one in service.
        """
        context = self._build(identity)
        self.context = context
        self.identity = identity
        self.horizon = ChainHorizon()
        self._sessions = []

    def _renew_past_horizon(self) -> None:
        """
        Once a CA certificate that sessions of the current context may lean
        on has expired, build the context again: its new ticket key voids
        every session from before, and peers make full handshakes.
        """
        if self.identity is None or not self.horizon.passed():
            return
        log.info(
            "a CA certificate in a peer's verified chain has expired: TLS "
            "sessions from before are void"
        )
        try:
            self.update(self.identity)
        except Exception as error:  # noqa: BLE001 - any failure to build
            # The old context stays, and its passed horizon refuses every
            # resumption on it (HalfCloseTLSProtocol), so peers must make
            # full handshakes anyway.
            log.error(
                "cannot rebuild the TLS context ({error}); resumed sessions are "
                "refused until the next identity update",
                error=error,
            )

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        self._renew_past_horizon()
        tlsProtocol.handshake = HandshakeState(horizon=self.horizon)
        return SSL.Connection(self.context, None)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        self._renew_past_horizon()
        context = self.context
        connection = SSL.Connection(context, None)
        if self.server_name and not _is_ip(self.server_name):
            connection.set_tlsext_host_name(self.server_name.encode("idna"))
        if self._sessions:
            connection.set_session(self._sessions.pop())

        def keep_session(done: SSL.Connection) -> None:
            if context is not self.context:
                return
            self._sessions.append(done.get_session())
            if len(self._sessions) > MAX_KEPT_SESSIONS:
                del self._sessions[0]

        tlsProtocol.handshake = HandshakeState(
            keep_session=keep_session, horizon=self.horizon
        )
        return connection


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def handshake_state(transport) -> HandshakeState | None:
    """
    The verification outcome hung on a TLS transport's connection, if any.
    """
    return getattr(transport, "handshake", None)
