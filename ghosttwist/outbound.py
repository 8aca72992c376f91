"""
Reaching the target through an outbound proxy (client mode's C{--proxy}):
HTTP C{CONNECT} or SOCKS5, with optional user and password in the URL.

L{ProxiedEndpoint} is an ordinary L{IStreamClientEndpoint}: it dials the
proxy, asks it for a tunnel to the target, and only then hands the
connection to the protocol the caller wanted, which sees nothing of the
proxy. A proxy that refuses or breaks the exchange fails that one
connection with L{ProxyError}.
"""

from __future__ import annotations

import base64
import ipaddress
import struct
from collections.abc import Callable
from typing import Literal
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConnector, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from zope.interface import implementer

from ghosttwist.addresses import Address


class InvalidProxyURL(ValueError):
    """
    A C{--proxy} value that cannot be used; the message says why.
    """


class ProxyError(Exception):
    """
    The proxy would not, or could not, open a tunnel to the target.
    """


@attrs.frozen
class ProxyURL:
    """
    An outbound proxy: its scheme, address and optional credentials.
    """

    scheme: Literal["http", "socks5"]
    address: Address
    username: str = ""
    password: str = attrs.field(default="", repr=False)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


def parse_proxy_url(text: str) -> ProxyURL:
    """
    Parse C{http://[user:pass@]HOST:PORT} or C{socks5://[user:pass@]HOST:PORT}.

    @raise InvalidProxyURL: with a one-line message.
    """
    parts = urlsplit(text)
    if parts.scheme not in ("http", "socks5"):
        raise InvalidProxyURL(
            f"--proxy {_redact(text)!r}: use http://HOST:PORT or socks5://HOST:PORT"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port or parts.path not in ("", "/") or parts.query:
        raise InvalidProxyURL(
            f"--proxy {_redact(text)!r}: expected {parts.scheme}://HOST:PORT"
        )

    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if parts.scheme == "socks5" and (len(username) > 255 or len(password) > 255):
        raise InvalidProxyURL(
            "--proxy: SOCKS5 user names and passwords end at 255 bytes"
        )
    return ProxyURL(
        parts.scheme, Address("tcp", host=host, port=port), username, password
    )


def _redact(text: str) -> str:
    parts = urlsplit(text)
    if parts.password is None:
        return text
    return text.replace(f":{parts.password}@", ":***@", 1)


@implementer(IStreamClientEndpoint)
class ProxiedEndpoint:
    """
    Dials C{target} (host and port) through C{proxy}.
    """

    def __init__(
        self, reactor, proxy: ProxyURL, target: Address, timeout: float
    ) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.target = target
        self.timeout = timeout

    def connect(self, factory) -> Deferred:
        handshake_class = _HTTPConnect if self.proxy.scheme == "http" else _Socks5
        done: Deferred = Deferred(lambda d: handshake.cancel())
        handshake = handshake_class(self.proxy, self.target, factory, done)
        dialing = self.proxy.address.client_endpoint(
            self.reactor, self.timeout
        ).connect(_Once(handshake))
        dialing.addErrback(handshake.dial_failed)
        handshake.dialing = dialing
        return done


class _Once(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self.protocol_instance


class _Handshake(Protocol):
    """
    The talk with the proxy; once the tunnel is open, the connection is
    handed to the caller's protocol.
    """

    def __init__(self, proxy: ProxyURL, target: Address, factory, done: Deferred):
        self.proxy = proxy
        self.target = target
        self.factory = factory
        self.done = done
        self.dialing: Deferred | None = None
        self.buffer = b""
        self.finished = False

    def dial_failed(self, failure) -> None:
        if not self.finished:
            self.finished = True
            self.done.errback(
                ProxyError(
                    f"cannot reach proxy {self.proxy}: {failure.getErrorMessage()}"
                )
            )

    def cancel(self) -> None:
        self.finished = True
        if self.dialing is not None and not self.dialing.called:
            self.dialing.cancel()
        if self.transport is not None:
            self.transport.abortConnection()

    def fail(self, why: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.done.errback(ProxyError(f"proxy {self.proxy} {why}"))
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        if not self.finished:
            detail = "closed the connection"
            if reason is not None and not reason.check(ConnectionDone):
                detail = f"failed: {reason.getErrorMessage()}"
            self.fail(f"{detail} before the tunnel opened")

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self.buffer += data
        self.step()

    def step(self) -> None:
        raise NotImplementedError

    def open(self, rest: bytes) -> None:
        """
        The tunnel is open: the caller's protocol takes the connection.
        """
        self.finished = True
        transport = self.transport
        protocol = self.factory.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.done.callback(protocol)
        if rest:
            protocol.dataReceived(rest)


class _HTTPConnect(_Handshake):
    """
    HTTP/1.1 C{CONNECT host:port}; any 2xx answer opens the tunnel.
    """

    def connectionMade(self) -> None:
        authority = str(self.target)
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self.proxy.username or self.proxy.password:
            token = f"{self.proxy.username}:{self.proxy.password}".encode()
            lines.append(
                f"Proxy-Authorization: Basic {base64.b64encode(token).decode()}"
            )
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def step(self) -> None:
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            if len(self.buffer) > 16384:
                self.fail("sent an answer header longer than 16 KiB")
            return

        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        fields = status_line.split(" ", 2)
        if (
            len(fields) < 2
            or not fields[0].startswith("HTTP/")
            or not fields[1].isdigit()
        ):
            self.fail(f"answered CONNECT with {status_line[:80]!r}")
            return
        if not fields[1].startswith("2"):
            self.fail(f"refused CONNECT {self.target}: {status_line[:80]}")
            return
        self.open(rest)


_SOCKS_REPLIES = {
    1: "general failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class _Socks5(_Handshake):
    """
    SOCKS5 (RFC 1928) C{CONNECT}, with user and password authentication
    (RFC 1929) when the URL carries them. Names are resolved by the proxy.
    """

    stage = "method"

    def connectionMade(self) -> None:
        methods = b"\x00\x02" if self.proxy.username or self.proxy.password else b"\x00"
        self.transport.write(bytes([5, len(methods)]) + methods)

    def step(self) -> None:
        while not self.finished:
            before = self.stage
            getattr(self, f"_{self.stage}")()
            if self.stage == before:
                return

    def _method(self) -> None:
        if len(self.buffer) < 2:
            return
        version, method = self.buffer[0], self.buffer[1]
        self.buffer = self.buffer[2:]
        if version != 5:
            self.fail("does not speak SOCKS5")
        elif method == 0:
            self._send_connect()
        elif method == 2 and (self.proxy.username or self.proxy.password):
            user = self.proxy.username.encode()
            password = self.proxy.password.encode()
            self.transport.write(
                bytes([1, len(user)]) + user + bytes([len(password)]) + password
            )
            self.stage = "auth"
        else:
            self.fail("accepts none of our SOCKS5 authentication methods")

    def _auth(self) -> None:
        if len(self.buffer) < 2:
            return
        status = self.buffer[1]
        self.buffer = self.buffer[2:]
        if status != 0:
            self.fail("refused the user name and password")
            return
        self._send_connect()

    def _send_connect(self) -> None:
        host, port = self.target.host, self.target.port
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            name = host.encode("idna")
            address = bytes([3, len(name)]) + name
        else:
            address = bytes([1 if ip.version == 4 else 4]) + ip.packed
        self.transport.write(b"\x05\x01\x00" + address + struct.pack("!H", port))
        self.stage = "reply"

    def _reply(self) -> None:
        if len(self.buffer) < 5:
            return
        version, reply, _, kind = self.buffer[:4]
        if version != 5:
            self.fail("sent a malformed SOCKS5 reply")
            return
        if reply != 0:
            why = _SOCKS_REPLIES.get(reply, f"error {reply}")
            self.fail(f"refused CONNECT {self.target}: {why}")
            return

        sizes = {1: 4, 4: 16, 3: 1 + self.buffer[4]}
        if kind not in sizes:
            self.fail("sent a SOCKS5 reply with an unknown address type")
            return
        length = 4 + sizes[kind] + 2
        if len(self.buffer) < length:
            return
        self.open(self.buffer[length:])


Dialer = Callable[[ClientFactory, "float | None"], IConnector]


def direct_dialer(config, reactor) -> Dialer | None:
    """
    A function that dials a tunnel's target straight through the reactor
    (C{connectTCP}, C{connectUNIX}) with a factory and a connect timeout
    (L{None}: none), or L{None} when the target needs an endpoint: through
    C{--proxy}, or a host name to resolve.

    Endpoints cost a L{Deferred}, a wrapping factory and a wrapping
    protocol per connection, and the wrapping protocol stays between the
    socket and the protocol for every event: a few percent of a tunnel's
    time under many short connections. Decided once per tunnel.
    """
    target = config.target
    if config.outbound_proxy is not None:
        return None
    if target.kind == "unix":
        path = target.path

        def dial_unix(factory: ClientFactory, timeout: float | None) -> IConnector:
            return reactor.connectUNIX(path, factory, timeout=timeout)

        return dial_unix
    if target.kind != "tcp" or not target.is_ip:
        return None
    host, port = target.host, target.port

    def dial_tcp(factory: ClientFactory, timeout: float | None) -> IConnector:
        return reactor.connectTCP(host, port, factory, timeout=timeout)

    return dial_tcp


def target_endpoint(config, reactor) -> IStreamClientEndpoint:
    """
    The endpoint that dials a tunnel's target: through C{--proxy} if one
    is set, directly otherwise.
    """
    if config.outbound_proxy is not None:
        return ProxiedEndpoint(
            reactor, config.outbound_proxy, config.target, config.connect_timeout
        )
    return config.target.client_endpoint(reactor, config.connect_timeout)
