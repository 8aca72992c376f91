"""
An HTTP CONNECT proxy and a SOCKS5 proxy written with Twisted, for the
outbound proxy tests; run as a process:

    python -m tests.proxies http|socks5 PORT [USER:PASSWORD]

They listen on 127.0.0.1 and open tunnels only to loopback addresses.
Each tunnel they open is logged as C{tunnel to HOST:PORT}. Not supported:
SOCKS5 BIND and UDP, IPv6 and name targets other than localhost.
"""

from __future__ import annotations

import base64
import ipaddress
import struct
import sys

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Pipe(protocol.Protocol):
    def __init__(self, peer: protocol.Protocol) -> None:
        self.peer = peer

    def connectionMade(self) -> None:
        self.peer.outbound_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        self.peer.transport.loseConnection()


class _Tunnel(protocol.Protocol):
    """
    Reads a request, dials the target, then copies bytes both ways.
    """

    def __init__(self, credentials: str) -> None:
        self.credentials = credentials
        self.buffer = b""
        self.outbound = None

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is not None:
            self.outbound.transport.write(data)
            return
        self.buffer += data
        self.request()

    def dial(self, host: str, port: int) -> None:
        if not _loopback(host):
            self.refuse()
            return
        host = "127.0.0.1" if host == "localhost" else host
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5)
        dialing = endpoint.connect(protocol.Factory.forProtocol(lambda: _Pipe(self)))
        dialing.addErrback(lambda failure: self.refuse())
        print(f"tunnel to {host}:{port}", flush=True)

    def outbound_ready(self, pipe: _Pipe) -> None:
        self.outbound = pipe
        self.accept()
        if self.buffer:
            pipe.transport.write(self.buffer)
            self.buffer = b""

    def connectionLost(self, reason=None) -> None:
        if self.outbound is not None:
            self.outbound.transport.loseConnection()


class _HTTPConnect(_Tunnel):
    def request(self) -> None:
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        self.buffer = rest
        lines = head.decode("latin-1").split("\r\n")
        method, authority, _ = lines[0].split(" ", 2)
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        if method != "CONNECT":
            self.reply(b"405 Method Not Allowed")
            return
        if self.credentials:
            token = base64.b64encode(self.credentials.encode()).decode()
            if headers.get("Proxy-Authorization") != f"Basic {token}":
                self.reply(b"407 Proxy Authentication Required")
                return
        host, _, port = authority.rpartition(":")
        self.dial(host.strip("[]"), int(port))

    def reply(self, status: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status + b"\r\n\r\n")
        self.transport.loseConnection()

    def refuse(self) -> None:
        self.reply(b"502 Bad Gateway")

    def accept(self) -> None:
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")


class _Socks5(_Tunnel):
    stage = "greeting"

    def request(self) -> None:
        while True:
            before = self.stage
            getattr(self, self.stage)()
            if self.stage == before or self.stage == "done":
                return

    def greeting(self) -> None:
        if len(self.buffer) < 2 or len(self.buffer) < 2 + self.buffer[1]:
            return
        methods = self.buffer[2 : 2 + self.buffer[1]]
        self.buffer = self.buffer[2 + self.buffer[1] :]
        wanted = 2 if self.credentials else 0
        if wanted not in methods:
            self.transport.write(b"\x05\xff")
            self.transport.loseConnection()
            self.stage = "done"
            return
        self.transport.write(bytes([5, wanted]))
        self.stage = "login" if self.credentials else "connect"

    def login(self) -> None:
        data = self.buffer
        if len(data) < 2 or len(data) < 3 + data[1]:
            return
        user_end = 2 + data[1]
        if len(data) < user_end + 1 + data[user_end]:
            return
        user = data[2:user_end].decode()
        password = data[user_end + 1 : user_end + 1 + data[user_end]].decode()
        self.buffer = data[user_end + 1 + data[user_end] :]
        if f"{user}:{password}" != self.credentials:
            self.transport.write(b"\x01\x01")
            self.transport.loseConnection()
            self.stage = "done"
            return
        self.transport.write(b"\x01\x00")
        self.stage = "connect"

    def connect(self) -> None:
        data = self.buffer
        if len(data) < 5:
            return
        kind = data[3]
        if kind == 1:
            end = 4 + 4
            host = str(ipaddress.IPv4Address(data[4:end]))
        elif kind == 3:
            end = 5 + data[4]
            host = data[5:end].decode()
        else:
            self.refuse(8)
            return
        if len(data) < end + 2:
            return
        (port,) = struct.unpack("!H", data[end : end + 2])
        self.buffer = data[end + 2 :]
        self.stage = "done"
        self.dial(host, port)

    def refuse(self, code: int = 5) -> None:
        self.transport.write(bytes([5, code, 0, 1]) + b"\x00" * 6)
        self.transport.loseConnection()
        self.stage = "done"

    def accept(self) -> None:
        self.transport.write(b"\x05\x00\x00\x01" + b"\x7f\x00\x00\x01" + b"\x00\x00")


def main(kind: str, port: str, credentials: str = "") -> None:
    cls = _HTTPConnect if kind == "http" else _Socks5
    factory = protocol.Factory.forProtocol(lambda: cls(credentials))
    reactor.listenTCP(int(port), factory, interface="127.0.0.1")
    print(f"{kind} proxy listening on 127.0.0.1:{port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
