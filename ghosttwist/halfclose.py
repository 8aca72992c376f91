"""
A TLS transport that passes half-close through.

Twisted's memory-BIO TLS transport ends the whole connection when the peer
sends close_notify. A tunnel must instead treat close_notify as the peer's
end of writing (as a TCP FIN is), keep sending in the other direction, and
send its own close_notify when its side is done writing.

The receiving half is rewired by replacing the transport's receive loop;
the sending half is the new L{HalfCloseTLSProtocol.loseWriteConnection}.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

_READ_SIZE = 2**16


class HalfCloseTLSProtocol(BufferingTLSTransport):
    """
    A TLS transport whose wrapped protocol hears close_notify as
    C{readConnectionLost} when it provides L{IHalfCloseableProtocol}.
    """

    _receivedCloseNotify = False
    _sentCloseNotify = False

    # The peer verification outcome (a tls.HandshakeState), set when the
    # connection is created. A class attribute so that ProtocolWrapper's
    # attribute forwarding never reaches the TCP transport for it.
    handshake = None

    def loseWriteConnection(self) -> None:
        """
        Send close_notify and keep reading until the peer sends its own.
        """
        if self._lostTLSConnection or self._sentCloseNotify or not self.connected:
            return

        if not self._handshakeDone:
            self.loseConnection()
            return

        self._aggregator.flush()
        self._sentCloseNotify = True
        try:
            bothClosed = self._tlsConnection.shutdown()
        except Error:
            bothClosed = False
        self._flushSendBIO()

        if bothClosed or self._receivedCloseNotify:
            self._lostTLSConnection = True
            self.transport.loseConnection()

    def _flushReceiveBIO(self) -> None:
        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(_READ_SIZE)
            except WantReadError:
                break
            except ZeroReturnError:
                self._closeNotifyReceived()
                break
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)

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
