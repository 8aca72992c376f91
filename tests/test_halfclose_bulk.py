"""
How the half-closing TLS transport moves bulk data, over real TLS between
two in-memory protocols (twisted.test.iosim): the records of one receive
reach the protocol as one delivery, in order and before whatever ends the
stream; a write leaves as one piece.
"""

from __future__ import annotations

import hashlib

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connectedServerAndClient
from zope.interface import implementer

from ghosttwist.halfclose import HalfCloseTLSFactory
from tests.test_halfclose_tls import _holder as _tls_holder
from tests.test_halfclose_tls import _identity

_CLIENT = "spiffe://domain.test/frontend"
_SERVER = "spiffe://domain.test/backend"

# Several 16 KiB records, none of them alike, so that order shows.
_PAYLOAD = b"".join(hashlib.sha256(b"%d" % n).digest() for n in range(3000))


@implementer(IHalfCloseableProtocol)
class Events(Protocol):
    """
    Records every event its transport delivers, in order.
    """

    pause_on_data = False

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))
        if self.pause_on_data:
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        self.events.append(("read-closed", None))

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.events.append(("lost", reason))

    def received(self) -> bytes:
        return b"".join(data for kind, data in self.events if kind == "data")

    def deliveries(self) -> int:
        return sum(1 for kind, _ in self.events if kind == "data")


class PausableTransport(FakeTransport):
    """
    An in-memory transport that remembers whether it was paused.
    """

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


def _holder(spiffe_id: str, server: bool, allowed: str):
    return _tls_holder(_identity(spiffe_id), server, (allowed,))


def _connect():
    clock = Clock()
    server_factory = HalfCloseTLSFactory(
        _holder(_SERVER, True, _CLIENT), False, Factory.forProtocol(Events), clock
    )
    client_factory = HalfCloseTLSFactory(
        _holder(_CLIENT, False, _SERVER), True, Factory.forProtocol(Events), clock
    )
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        serverTransportFactory=lambda protocol: PausableTransport(protocol, False),
        clock=clock,
        greet=False,
    )
    client.app, server.app = client.wrappedProtocol, server.wrappedProtocol
    pump.flush()
    assert client._handshakeDone and server._handshakeDone
    return client, server, pump


def test_records_of_one_receive_reach_the_protocol_as_one_delivery():
    """
    A receive that holds several TLS records is delivered once, with the
    bytes of every record in order.
    """
    client, server, pump = _connect()

    client.write(_PAYLOAD)
    wire = client.transport.getOutBuffer()
    assert len(wire) > 4 * 2**14
    server.dataReceived(wire)

    assert server.app.events == [("data", _PAYLOAD)]


def test_a_write_leaves_as_one_piece():
    """
    The records made from one write reach the TCP transport in one write,
    not as a full buffer and a sliver.
    """
    client, server, pump = _connect()

    client.write(_PAYLOAD[: 2**16])

    assert len(client.transport.stream) == 1
    pump.flush()
    assert server.app.received() == _PAYLOAD[: 2**16]


def test_data_before_close_notify_is_delivered_before_the_end_of_reading():
    """
    When data and close_notify arrive in one receive, the protocol gets the
    data first and then hears that the peer is done writing.
    """
    client, server, pump = _connect()

    client.write(_PAYLOAD)
    client.loseWriteConnection()
    server.dataReceived(client.transport.getOutBuffer())

    assert server.app.events == [("data", _PAYLOAD), ("read-closed", None)]


def test_data_before_a_broken_record_is_delivered_before_the_error():
    """
    Records that decrypt are delivered; the broken one after them ends the
    connection with an error, and nothing of it reaches the protocol.
    """
    client, server, pump = _connect()

    client.write(_PAYLOAD)
    wire = client.transport.getOutBuffer()
    forged = b"\x17\x03\x03\x00\x40" + b"\x00" * 0x40
    server.dataReceived(wire + forged)
    pump.flush()

    kinds = [kind for kind, _ in server.app.events]
    assert kinds == ["data", "lost"]
    assert server.app.received() == _PAYLOAD
    assert server.app.events[-1][1] is not None


def test_nothing_is_delivered_after_an_abort():
    """
    Records that arrive after the connection was aborted never reach the
    protocol.
    """
    client, server, pump = _connect()

    client.write(_PAYLOAD)
    wire = client.transport.getOutBuffer()
    server.abortConnection()
    server.dataReceived(wire)

    assert server.app.deliveries() == 0


def test_a_pause_during_a_delivery_reaches_the_tcp_transport():
    """
    A protocol that pauses while it handles a gathered delivery pauses the
    transport under TLS, and resuming resumes it.
    """
    client, server, pump = _connect()
    server.app.pause_on_data = True

    client.write(_PAYLOAD)
    pump.flush()

    assert server.app.events == [("data", _PAYLOAD)]
    assert server.transport.paused
    server.app.transport.resumeProducing()
    assert not server.transport.paused


def test_a_full_duplex_stream_arrives_whole_in_order():
    """
    Many writes each way, pumped together, arrive whole and in order on
    both sides.
    """
    client, server, pump = _connect()
    upstream = hashlib.sha256()
    downstream = hashlib.sha256()

    for n in range(40):
        chunk = _PAYLOAD[n * 997 : n * 997 + 50_000]
        client.write(chunk)
        server.write(chunk[::-1])
        upstream.update(chunk)
        downstream.update(chunk[::-1])
        if n % 3 == 0:
            pump.pump()
    pump.flush()

    assert hashlib.sha256(server.app.received()).digest() == upstream.digest()
    assert hashlib.sha256(client.app.received()).digest() == downstream.digest()


def test_a_large_write_is_encrypted_in_one_call():
    """
    A chunk of several records goes to OpenSSL in one send, and arrives
    whole.
    """
    client, server, pump = _connect()
    calls = []
    connection = client._tlsConnection
    send = connection.send

    def counting_send(buffer):
        calls.append(len(buffer))
        return send(buffer)

    connection.send = counting_send
    client.write(_PAYLOAD)
    pump.flush()

    assert calls == [len(_PAYLOAD)]
    assert server.app.received() == _PAYLOAD
