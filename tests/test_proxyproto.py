"""
In memory: PROXY v2 headers read back with Twisted's own parser (each
address family, and the TLVs after the addresses), the connection limit's
gate, C{--proxy} URLs and the CONNECT and SOCKS5 exchanges.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransportWithDisconnection,
)
from twisted.protocols.haproxy._v2parser import V2Parser

from ghosttwist import proxyproto
from ghosttwist.addresses import Address
from ghosttwist.limits import ConnectionLimit
from ghosttwist.outbound import (
    InvalidProxyURL,
    ProxiedEndpoint,
    ProxyError,
    parse_proxy_url,
)
from ghosttwist.proxy import ConnectionTracker


def _parse(header: bytes):
    parser = V2Parser()
    info, rest = parser.feed(header + b"data")
    assert rest == b"data"
    return info


def test_ipv4_addresses():
    header = proxyproto.header(
        "conn",
        IPv4Address("TCP", "127.0.0.2", 40000),
        IPv4Address("TCP", "127.0.0.1", 8443),
    )

    info = _parse(header)

    assert (info.source.host, info.source.port) == ("127.0.0.2", 40000)
    assert (info.destination.host, info.destination.port) == ("127.0.0.1", 8443)
    assert header[13] == proxyproto.PP2_FAMILY_TCP4


def test_ipv6_addresses():
    info = _parse(
        proxyproto.header(
            "conn",
            IPv6Address("TCP", "::1", 40000),
            IPv6Address("TCP", "fe80::1%lo", 8443),
        )
    )

    assert ipaddress.ip_address(info.source.host) == ipaddress.ip_address("::1")
    assert ipaddress.ip_address(info.destination.host) == ipaddress.ip_address(
        "fe80::1"
    )
    assert info.destination.port == 8443


def test_mixed_families_are_written_as_ipv6():
    info = _parse(
        proxyproto.header(
            "conn",
            IPv4Address("TCP", "127.0.0.1", 1),
            IPv6Address("TCP", "::1", 2),
        )
    )

    assert ipaddress.ip_address(info.source.host).ipv4_mapped == ipaddress.ip_address(
        "127.0.0.1"
    )


def test_unix_addresses():
    info = _parse(
        proxyproto.header(
            "conn", UNIXAddress(None), UNIXAddress(b"/run/ghosttwist/tunnel.sock")
        )
    )

    assert info.source.name == b""
    assert info.destination.name == b"/run/ghosttwist/tunnel.sock"


def test_spiffe_id_tlv_follows_the_addresses():
    header = proxyproto.header(
        "conn",
        IPv4Address("TCP", "127.0.0.1", 1),
        IPv4Address("TCP", "127.0.0.1", 2),
        spiffe_id="spiffe://domain.test/frontend",
    )

    info = _parse(header)
    (length,) = struct.unpack("!H", header[14:16])
    tlvs = proxyproto.parse_tlvs(header[16 + 12 : 16 + length])

    assert info.source.port == 1
    assert tlvs == [(0xE0, b"spiffe://domain.test/frontend")]


def test_no_spiffe_id_no_tlv():
    header = proxyproto.header(
        "conn", IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.0.0.1", 2)
    )

    assert len(header) == 16 + 12


def test_truncated_tlv_is_an_error():
    with pytest.raises(ValueError):
        proxyproto.parse_tlvs(b"\xe0\x00\x05abc")


class _Port:
    connected = True
    disconnecting = False

    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_limit_stops_and_resumes_accepting():
    tracker = ConnectionTracker()
    limit = ConnectionLimit(2, tracker)
    port = _Port()
    limit.attach(port)

    tracker.add("a")
    assert port.reading and limit.room() == 1
    tracker.add("b")
    assert not port.reading and limit.room() == 0
    tracker.remove("a")
    assert port.reading and limit.room() == 1


@pytest.mark.parametrize(
    "text, scheme, host, port, user, password",
    [
        ("http://127.0.0.1:3128", "http", "127.0.0.1", 3128, "", ""),
        (
            "socks5://u%40x:p%3Aw@localhost:1080",
            "socks5",
            "localhost",
            1080,
            "u@x",
            "p:w",
        ),
    ],
)
def test_proxy_urls(text, scheme, host, port, user, password):
    proxy = parse_proxy_url(text)

    assert (proxy.scheme, proxy.address.host, proxy.address.port) == (
        scheme,
        host,
        port,
    )
    assert (proxy.username, proxy.password) == (user, password)
    if password:
        assert password not in repr(proxy)


@pytest.mark.parametrize(
    "text", ["https://h:1", "http://h", "socks5://:1", "http://h:1/path"]
)
def test_bad_proxy_urls(text):
    with pytest.raises(InvalidProxyURL):
        parse_proxy_url(text)


def test_bad_proxy_url_message_hides_the_password():
    with pytest.raises(InvalidProxyURL) as raised:
        parse_proxy_url("http://user:hunter2@h")

    assert "hunter2" not in str(raised.value)


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _dial(url: str):
    """
    Dial 127.0.0.1:8443 through C{url} on a memory reactor; return the
    result Deferred and the proxy side's transport and protocol.
    """
    reactor = MemoryReactorClock()
    endpoint = ProxiedEndpoint(
        reactor, parse_proxy_url(url), Address("tcp", host="127.0.0.1", port=8443), 5
    )
    dialing = endpoint.connect(Factory.forProtocol(_Recorder))
    host, port, factory, _, _ = reactor.tcpClients[0]
    protocol = factory.buildProtocol(None)
    transport = StringTransportWithDisconnection()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return (host, port), dialing, transport, protocol


def test_http_connect_hands_the_connection_over():
    address, dialing, transport, proxy_side = _dial("http://u:p@127.0.0.1:3128")

    request = transport.value()
    proxy_side.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nearly bytes")
    protocol = dialing.result

    assert address == ("127.0.0.1", 3128)
    assert request.startswith(b"CONNECT 127.0.0.1:8443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dTpw\r\n" in request
    assert protocol.received == b"early bytes"


def test_http_connect_refusal_fails_the_dial():
    _, dialing, transport, proxy_side = _dial("http://127.0.0.1:3128")
    failures = []
    dialing.addErrback(failures.append)

    proxy_side.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")

    assert len(failures) == 1
    assert isinstance(failures[0].value, ProxyError)
    assert "403 Forbidden" in str(failures[0].value)
    assert not transport.connected


def test_socks5_asks_for_the_target_by_address():
    _, dialing, transport, proxy_side = _dial("socks5://127.0.0.1:1080")

    assert transport.value() == b"\x05\x01\x00"
    transport.clear()
    proxy_side.dataReceived(b"\x05\x00")
    assert transport.value() == b"\x05\x01\x00\x01\x7f\x00\x00\x01\x20\xfb"
    proxy_side.dataReceived(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00")

    assert isinstance(dialing.result, _Recorder)
