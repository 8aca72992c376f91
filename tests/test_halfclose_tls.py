"""
Half-close and peer verification over real TLS between two in-memory
protocols (twisted.test.iosim): no sockets, no processes.
"""

from __future__ import annotations

import datetime

from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from ghosttwist.auth.policy import Authorizer
from ghosttwist.auth.svid import BundleVerifier
from ghosttwist.halfclose import HalfCloseTLSFactory
from ghosttwist.identity import Identity
from ghosttwist.tls import ContextHolder, PeerPolicy, build_context
from tests import certs

_NOW = datetime.datetime.now(datetime.timezone.utc)
_VALID = {
    "not_before": _NOW - datetime.timedelta(hours=1),
    "not_after": _NOW + datetime.timedelta(hours=1),
}
_CA = certs.root_ca("domain.test CA", uris=["spiffe://domain.test"], **_VALID)


def _identity(spiffe_id: str) -> Identity:
    issued = certs.leaf(_CA, spiffe_id, **_VALID)
    return Identity(
        chain=(issued.cert,), key=issued.key, bundles={"domain.test": (_CA.cert,)}
    )


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class Recorder(Protocol):
    """
    Records what a TLS transport tells its protocol.
    """

    def __init__(self) -> None:
        self.received = b""
        self.handshake = False
        self.read_closed = False
        self.lost = None

    def handshakeCompleted(self) -> None:
        self.handshake = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.lost = reason


def _holder(identity: Identity, server: bool, allowed: tuple[str, ...]):
    authorizer = Authorizer(patterns=allowed)

    def build(current: Identity):
        policy = PeerPolicy(BundleVerifier(current.bundles), authorizer)
        return build_context(current, server=server, policy=policy)

    holder = ContextHolder(build)
    holder.update(identity)
    return holder


def _connect(
    allowed_client: tuple[str, ...] = ("spiffe://domain.test/frontend",),
    client_identity: Identity | None = None,
):
    clock = Clock()
    server_holder = _holder(_identity("spiffe://domain.test/backend"), True, allowed_client)
    client_holder = _holder(
        client_identity or _identity("spiffe://domain.test/frontend"),
        False,
        ("spiffe://domain.test/backend",),
    )
    server_factory = HalfCloseTLSFactory(
        server_holder, False, Factory.forProtocol(Recorder), clock
    )
    client_factory = HalfCloseTLSFactory(
        client_holder, True, Factory.forProtocol(Recorder), clock
    )
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
        greet=False,
    )
    # The TLS transport drops its protocol once the connection is lost;
    # keep them for the assertions.
    client.app, server.app = client.wrappedProtocol, server.wrappedProtocol
    pump.flush()
    return client, server, pump


def test_close_notify_is_an_end_of_writing_not_of_the_connection():
    """
    After the client sends close_notify the server still reads what was
    sent, hears readConnectionLost, and can keep writing back.
    """
    client, server, pump = _connect()
    assert server.app.handshake and client.app.handshake

    client.write(b"request")
    client.loseWriteConnection()
    pump.flush()

    assert server.app.received == b"request"
    assert server.app.read_closed
    assert server.app.lost is None

    server.write(b"response after half-close")
    pump.flush()

    assert client.app.received == b"response after half-close"
    assert client.app.lost is None


def test_both_ends_of_writing_close_the_connection():
    """
    Once each side has sent close_notify the connection ends on both sides.
    """
    client, server, pump = _connect()

    client.loseWriteConnection()
    pump.flush()
    server.loseWriteConnection()
    pump.flush()

    assert server.app.read_closed
    assert server.app.lost is not None
    assert client.app.lost is not None


def test_unauthorized_client_is_refused_during_the_handshake():
    """
    A client whose SPIFFE ID is not allowed never completes the handshake on
    the server, and the refusal says why.
    """
    client, server, pump = _connect(allowed_client=("spiffe://domain.test/other",))
    pump.flush()

    assert not server.app.handshake
    assert server.app.lost is not None
    assert server.handshake.refusal == "unauthorized"
    assert server.handshake.peer_id == "spiffe://domain.test/frontend"


def test_context_swap_leaves_open_connections_alone():
    """
    Updating the holder changes the context for new connections only.
    """
    holder = _holder(_identity("spiffe://domain.test/backend"), True, ())
    before = holder.context

    holder.update(_identity("spiffe://domain.test/backend"))

    assert holder.context is not before


def test_a_ca_as_leaf_is_refused_with_the_spiffe_reason():
    """
    When OpenSSL refuses a leaf that breaks a SPIFFE rule, the refusal names
    the rule, not OpenSSL's generic error, and names the peer's ID.
    """
    ca_leaf = certs.issue(
        "not a leaf", issuer=_CA, ca=True, uris=["spiffe://domain.test/frontend"],
        **_VALID,
    )
    identity = Identity(
        chain=(ca_leaf.cert,), key=ca_leaf.key, bundles={"domain.test": (_CA.cert,)}
    )

    client, server, pump = _connect(client_identity=identity)

    assert not server.app.handshake
    assert server.handshake.refusal == "leaf-is-ca"
    assert not server.handshake.detail.startswith("leaf-is-ca")
