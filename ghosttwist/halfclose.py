"""
A TLS transport that passes half-close through.

Twisted's memory-BIO TLS transport ends the whole connection when the peer
sends close_notify. A tunnel must instead treat close_notify as the peer's
end of writing (as a TCP FIN is), keep sending in the other direction, and
send its own close_notify when its side is done writing.

The receiving half is rewired by replacing the transport's receive loop;
the sending half is the new L{HalfCloseTLSProtocol.loseWriteConnection}.

A resumed TLS session skips certificate verification: before the wrapped
protocol hears that such a handshake completed, the context's policy
judges the session's certificate again (see L{ghosttwist.tls}), and a peer
it refuses is cut off. A client keeps the session its server issued once
the first bytes after the handshake arrive.

It is also built for a tunnel's traffic, where every write is a whole chunk
just read from the other side: writes are encrypted at once rather than
held for the next reactor turn (Twisted's C{BufferingTLSTransport} does
that for protocols that write many small pieces), and a large write goes
into OpenSSL without copies and out to the socket in one flush.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from ghosttwist.sendnow import send_now

_READ_SIZE = 2**16
# Under glibc's mmap threshold, so each read buffer is a cheap heap block.
_SEND_READ_SIZE = 2**16
# A TLS record carries at most 16 KiB of plaintext, and adds at most this
# much (header, explicit nonce, MAC or tag, padding) on the wire.
_RECORD = 2**14
_RECORD_OVERHEAD = 2**8

# pyOpenSSL turns on partial writes for every connection, so each
# SSL_write makes one record and returns. Off, one SSL_write encrypts a
# whole chunk, which saves about a third of the CPU that encrypting and
# flushing a 64 KiB chunk costs in Python. pyOpenSSL has no public call to
# turn a mode off; without the binding's SSL_clear_mode (or the
# connection's handle) writes stay one record per call, as before.
try:
    from OpenSSL._util import lib as _openssl

    _clear_mode = _openssl.SSL_clear_mode
    _PARTIAL_WRITE = _openssl.SSL_MODE_ENABLE_PARTIAL_WRITE
except (ImportError, AttributeError):  # pragma: no cover
    _clear_mode = None


def _whole_writes(connection) -> None:
    # With partial writes off, a write that cannot finish (a handshake
    # message to read first) must be retried with the same bytes; the
    # buffered-write path does that, and pyOpenSSL accepts the moved buffer.
    handle = getattr(connection, "_ssl", None)
    if _clear_mode is not None and handle is not None:
        _clear_mode(handle, _PARTIAL_WRITE)


class HalfCloseTLSProtocol(TLSMemoryBIOProtocol):
    """
    A TLS transport whose wrapped protocol hears close_notify as
    C{readConnectionLost} when it provides L{IHalfCloseableProtocol}.
    """

    _receivedCloseNotify = False
    _sentCloseNotify = False
    _wholeWrites = False

    # The peer verification outcome (a tls.HandshakeState), set when the
    # connection is created. A class attribute so that ProtocolWrapper's
    # attribute forwarding never reaches the TCP transport for it.
    handshake = None

    def dataReceived(self, data: bytes) -> None:
        settled = self._handshakeDone
        TLSMemoryBIOProtocol.dataReceived(self, data)

        # Tickets follow the handshake, so the first bytes after it carry
        # the session a client keeps for its next connection.
        state = self.handshake
        if settled and state is not None and state.keep_session is not None:
            keep, state.keep_session = state.keep_session, None
            if self._tlsConnection is not None and not self._lostTLSConnection:
                keep(self._tlsConnection)

    def _checkHandshakeStatus(self) -> None:
        # Twisted's own, with one step added: a resumed session, which
        # skipped certificate verification, is judged again before the
        # wrapped protocol hears that the handshake completed.
        if self._aborted:
            return
        try:
            self._tlsConnection.do_handshake()
        except WantReadError:
            self._flushSendBIO()
        except Error:
            self._tlsShutdownFinished(Failure())
        else:
            if not self._resumed_peer_allowed():
                return
            self._handshakeDone = True
            if IHandshakeListener.providedBy(self.wrappedProtocol):
                self.wrappedProtocol.handshakeCompleted()

    def _resumed_peer_allowed(self) -> bool:
        """
        Whether the peer may go on: always after a full handshake (the
        verify callback judged it); after a resumed one, only if the
        context's policy, asked again now, allows the certificate the
        session was made with. A refused peer is cut off at once.

        The session keeps no chain: a full handshake leaves its chain's
        earliest CA expiry on the context's horizon (before the tickets it
        brings leave), and no session resumes once that has passed.
        """
        state = self.handshake
        if state is None:
            return True
        if state.verified:
            if state.horizon is not None:
                state.horizon.note(state.chain)
            return True

        connection = self._tlsConnection
        policy = connection.get_context().get_app_data()
        if policy is None:
            return True

        if state.horizon is not None and state.horizon.passed():
            state.refusal = "expired"
            state.detail = (
                "resumed session: a CA certificate in the peer's chain has expired"
            )
        elif policy.judge_resumed(state, connection.get_peer_certificate()):
            return True

        self._reason = Failure(Error([("ghosttwist", "resumption", state.detail)]))
        self._lostTLSConnection = True
        self._aborted = True
        self.disconnecting = True
        self.transport.abortConnection()
        return False

    def loseWriteConnection(self) -> None:
        """
        Send close_notify and keep reading until the peer sends its own.
        """
        if self._lostTLSConnection or self._sentCloseNotify or not self.connected:
            return

        if not self._handshakeDone:
            self.loseConnection()
            return

        self._sentCloseNotify = True
        try:
            bothClosed = self._tlsConnection.shutdown()
        except Error:
            bothClosed = False
        self._flushSendBIO()

        if bothClosed or self._receivedCloseNotify:
            self._lostTLSConnection = True
            self.transport.loseConnection()

    def _write(self, data) -> None:
        if self._lostTLSConnection:
            return

        # One send takes the whole chunk (see _whole_writes); if OpenSSL
        # stops early, memoryview slices hand it the rest without copying.
        # The send BIO is emptied once at the end.
        if not self._wholeWrites:
            self._wholeWrites = True
            _whole_writes(self._tlsConnection)
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(view):
                sent += self._tlsConnection.send(view[sent:])
        except WantReadError:
            self._flushSendBIO()
            self._bufferedWrite(bytes(view[sent:]))
            return
        except Error:
            self._flushSendBIO()
            self._tlsShutdownFinished(Failure())
            return
        # Sized for the records just made, so that they leave in one
        # read and one send rather than a full read and a sliver.
        self._flushSendBIO(sent + (sent // _RECORD + 1) * _RECORD_OVERHEAD)

    def _flushSendBIO(self, size: int = _SEND_READ_SIZE) -> None:
        while True:
            try:
                data = self._tlsConnection.bio_read(size)
            except WantReadError:
                return
            send_now(self.transport, data)
            if len(data) < size:
                return

    def _flushReceiveBIO(self) -> None:
        # OpenSSL hands out one record (16 KiB at most) per recv, and one
        # read from the socket holds several. Their plaintext is gathered
        # and delivered once, so the other side sends it in one system
        # call rather than one per record. Whatever came before a
        # close_notify or an error is delivered before either is acted on.
        chunks = []
        closeNotify = False
        failure = None
        while not self._lostTLSConnection:
            try:
                chunks.append(self._tlsConnection.recv(_READ_SIZE))
            except WantReadError:
                break
            except ZeroReturnError:
                closeNotify = True
                break
            except Error:
                failure = Failure()
                break

        if chunks and not self._aborted:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            del chunks
            ProtocolWrapper.dataReceived(self, data)
        if closeNotify:
            self._closeNotifyReceived()
        elif failure is not None:
            self._tlsShutdownFinished(failure)

        self._flushSendBIO()

    def _closeNotifyReceived(self) -> None:
        if self._receivedCloseNotify:
            return
        self._receivedCloseNotify = True

        halfCloseable = IHalfCloseableProtocol.providedBy(self.wrappedProtocol)
        if self._sentCloseNotify or not halfCloseable or self.disconnecting:
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
            return

        self.wrappedProtocol.readConnectionLost()


class HalfCloseTLSFactory(TLSMemoryBIOFactory):
    """
    A TLS wrapping factory whose connections pass half-close through.
    """

    protocol = HalfCloseTLSProtocol
