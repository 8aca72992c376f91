"""
TLS session resumption, in memory: a peer that resumes skips the verify
callback, so the context's policy judges the session's certificate again
when the handshake completes, on both sides. Real TLS between in-memory
protocols (twisted.test.iosim).
"""

from __future__ import annotations

import datetime

import attrs
import pytest
from OpenSSL import SSL
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient

from ghosttwist.auth.certnames import NameRules
from ghosttwist.auth.policy import Authorizer
from ghosttwist.auth.svid import BundleVerifier
from ghosttwist.halfclose import HalfCloseTLSFactory
from ghosttwist.identity import Identity
from ghosttwist.tls import (
    MAX_TICKET_LIFETIME,
    CertPolicy,
    ContextHolder,
    HandshakeState,
    PeerPolicy,
    build_context,
)
from tests import certs
from tests.test_halfclose_tls import Recorder

_NOW = datetime.datetime.now(datetime.UTC)
_HOUR = datetime.timedelta(hours=1)
_VALID = {"not_before": _NOW - _HOUR, "not_after": _NOW + _HOUR}
_CA = certs.root_ca("domain.test CA", uris=["spiffe://domain.test"], **_VALID)
_FRONTEND = "spiffe://domain.test/frontend"
_BACKEND = "spiffe://domain.test/backend"
_BUNDLES = {"domain.test": (_CA.cert,)}


def _identity(spiffe_id: str, **validity) -> Identity:
    issued = certs.leaf(_CA, spiffe_id, **(validity or _VALID))
    return Identity(chain=(issued.cert,), key=issued.key, bundles=_BUNDLES)


def _policy(allowed: str) -> PeerPolicy:
    return PeerPolicy(BundleVerifier(_BUNDLES), Authorizer(patterns=(allowed,)))


@attrs.define
class _Switch:
    """
    A policy that can be replaced after its context was built: it stands
    for a policy change that kept the ticket key (ghosttwist's own changes
    never do), to show the judgement of a resumed session does not lean on
    the new ticket key alone.
    """

    current: PeerPolicy

    def verify(self, *args) -> bool:
        return self.current.verify(*args)

    def judge_resumed(self, state, leaf) -> bool:
        return self.current.judge_resumed(state, leaf)


def _holder(identity: Identity, server: bool, allowed: str) -> ContextHolder:
    holder = ContextHolder(
        lambda current: build_context(
            current, server=server, policy=_Switch(_policy(allowed))
        )
    )
    holder.update(identity)
    return holder


@attrs.define
class _Peers:
    """
    A server allowing domain.test/frontend and a client verifying
    domain.test/backend; each L{connect} is a new connection between them,
    the client offering whatever session it kept.
    """

    server: ContextHolder = attrs.field(
        factory=lambda: _holder(_identity(_BACKEND), True, _FRONTEND)
    )
    client: ContextHolder = attrs.field(
        factory=lambda: _holder(_identity(_FRONTEND), False, _BACKEND)
    )

    def connect(self, data: bytes = b"hello"):
        server, client, pump = self.open()
        pump.flush()
        if client.app.handshake:
            client.write(data)
        pump.flush()
        return server, client

    def open(self):
        """
        A new connection, its handshake not yet run: the client has picked
        the session it offers.
        """
        clock = Clock()
        server_factory = HalfCloseTLSFactory(
            self.server, False, Factory.forProtocol(Recorder), clock
        )
        client_factory = HalfCloseTLSFactory(
            self.client, True, Factory.forProtocol(Recorder), clock
        )
        client, server, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            clock=clock,
            greet=False,
        )
        server.app, client.app = server.wrappedProtocol, client.wrappedProtocol
        return server, client, pump


def test_a_returning_client_resumes_and_is_judged_again():
    peers = _Peers()
    first, _ = peers.connect()
    server, client = peers.connect()

    assert first.handshake.verified and not first.handshake.resumed
    assert not server.handshake.verified
    assert server.handshake.resumed and client.handshake.resumed
    assert server.handshake.peer_id == _FRONTEND
    assert client.handshake.peer_id == _BACKEND
    assert server.handshake.decision.endswith(", session resumed")
    assert server.app.received == b"hello"


def test_every_connection_brings_the_session_for_a_later_one():
    """
    (The connections stay open: OpenSSL spoils the session of a connection
    freed without a close_notify.)
    """
    peers = _Peers()
    pairs = [peers.connect() for _ in range(5)]

    assert [server.handshake.resumed for server, _ in pairs] == [False] + [True] * 4
    assert all(server.app.received == b"hello" for server, _ in pairs)


def test_each_kept_session_is_offered_once():
    """
    Two connections opened at once, with one session kept: one resumes,
    the other makes a full handshake (a TLS 1.3 ticket serves once).
    """
    peers = _Peers()
    peers.connect()
    (server_a, _, pump_a), (server_b, _, pump_b) = peers.open(), peers.open()
    pump_a.flush()
    pump_b.flush()

    assert [server_a.handshake.resumed, server_b.handshake.resumed] == [True, False]
    assert server_b.handshake.verified


def test_a_new_context_makes_every_old_session_useless():
    """
    An identity update (here the same identity again) builds a new context:
    the session kept from before does not resume on it.
    """
    peers = _Peers()
    peers.connect()
    peers.server.update(peers.server.identity)
    server, _ = peers.connect()

    assert server.handshake.verified
    assert not server.handshake.resumed
    assert server.app.received == b"hello"


def test_server_refuses_a_resumed_client_its_policy_no_longer_allows():
    """
    Were a policy to change while the ticket key stays (a context's policy
    swapped in place), a resumed session is still judged by the policy of
    now, and refused before the protocol hears of it.
    """
    peers = _Peers()
    peers.connect()
    peers.server.context.get_app_data().current = _policy("spiffe://domain.test/x")
    server, _ = peers.connect()

    assert server.handshake.refusal == "unauthorized"
    assert not server.app.handshake
    assert server.app.received == b""
    assert server.app.lost is not None


def test_client_refuses_a_resumed_server_its_policy_no_longer_allows():
    peers = _Peers()
    peers.connect()
    peers.client.context.get_app_data().current = _policy("spiffe://domain.test/x")
    server, client = peers.connect()

    assert client.handshake.refusal == "unauthorized"
    assert not client.app.handshake
    assert server.app.received == b""


def _leaf(**kwargs):
    from OpenSSL import crypto

    return crypto.X509.from_cryptography(certs.leaf(_CA, **kwargs).cert)


@pytest.mark.parametrize(
    "leaf, reason",
    [
        (None, "no-certificate"),
        (
            lambda: _leaf(
                spiffe_id=_FRONTEND, not_before=_NOW - 3 * _HOUR, not_after=_NOW - _HOUR
            ),
            "expired",
        ),
        (
            lambda: _leaf(
                spiffe_id=_FRONTEND, not_before=_NOW + _HOUR, not_after=_NOW + 2 * _HOUR
            ),
            "not-yet-valid",
        ),
        (lambda: _leaf(spiffe_id="spiffe://other.test/frontend", **_VALID), None),
        (lambda: _leaf(spiffe_id=_FRONTEND, ca=True, **_VALID), "leaf-is-ca"),
        (lambda: _leaf(spiffe_id=None, uris=[], **_VALID), "no-spiffe-id"),
        (lambda: _leaf(spiffe_id="spiffe://domain.test/intruder", **_VALID), None),
    ],
)
def test_judging_a_resumed_spiffe_peer(leaf, reason):
    state = HandshakeState()
    allowed = _policy(_FRONTEND).judge_resumed(state, leaf() if leaf else None)

    assert allowed is False
    assert not state.resumed
    if reason is not None:
        assert state.refusal == reason
    else:
        assert state.refusal in ("unknown-trust-domain", "unauthorized")


def test_judging_a_resumed_peer_by_name_rules():
    policy = CertPolicy(rules=NameRules(common_names=("frontend",)))
    allowed, refused = HandshakeState(), HandshakeState()

    assert policy.judge_resumed(allowed, _cn_leaf("frontend"))
    assert not policy.judge_resumed(refused, _cn_leaf("intruder"))
    assert allowed.resumed and refused.refusal == "unauthorized"


def _cn_leaf(name: str):
    from OpenSSL import crypto

    return crypto.X509.from_cryptography(certs.issue(name, issuer=_CA, **_VALID).cert)


def test_tickets_never_outlive_the_certificate_presented():
    soon = _identity(_BACKEND, not_before=_NOW - _HOUR, not_after=_NOW + 100 * _SECOND)
    context = build_context(soon, server=True, policy=_policy(_FRONTEND))
    lasting = _identity(_BACKEND, not_before=_NOW - _HOUR, not_after=_NOW + 9 * _HOUR)
    long_lived = build_context(lasting, server=True, policy=_policy(_FRONTEND))

    assert 0 < context.get_timeout() <= 100
    assert long_lived.get_timeout() == MAX_TICKET_LIFETIME


_SECOND = datetime.timedelta(seconds=1)


def test_a_rego_policy_turns_tickets_off():
    rego = CertPolicy(rego=object())
    names = CertPolicy(rules=NameRules(common_names=("frontend",)))

    def options(policy):
        context = build_context(_identity(_BACKEND), server=True, policy=policy)
        return context.set_options(0)

    assert options(rego) & SSL.OP_NO_TICKET
    assert not options(names) & SSL.OP_NO_TICKET
