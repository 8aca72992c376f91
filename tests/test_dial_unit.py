"""
Dialing the target straight through the reactor (no endpoint) for IP and
unix targets: the connect timeout still cuts a dial that does not finish,
a target that refuses is reported as through an endpoint, and targets that
need an endpoint (a host name, C{--proxy}) still get one. In memory, on a
L{MemoryReactorClock}.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionRefusedError, UserError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from ghosttwist.addresses import parse_address
from ghosttwist.config import TunnelConfig
from ghosttwist.outbound import direct_dialer, parse_proxy_url
from ghosttwist.proxy import TunnelFactory
from ghosttwist.tls import ContextHolder


def _config(target: str = "127.0.0.1:8443", **kwargs) -> TunnelConfig:
    return TunnelConfig(
        mode="client",
        listen=parse_address("127.0.0.1:8080", flag="--listen"),
        target=parse_address(target, flag="--target"),
        **kwargs,
    )


class _Transport(StringTransport):
    """
    A string transport that, like Twisted's socket transports, lets a
    producer be unregistered when none is registered.
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


def _accept(config: TunnelConfig, reactor: MemoryReactorClock):
    """
    A client tunnel on C{reactor} that has just accepted one plain
    connection and started dialing; its splice and the accepted transport.
    """
    tunnel = TunnelFactory(config, ContextHolder(lambda identity: None), reactor)
    inbound = tunnel.buildProtocol(None)
    transport = _Transport()
    inbound.makeConnection(transport)
    return tunnel, inbound.splice, transport


def _lines(events) -> list[str]:
    return [formatEvent(event) for event in events]


def test_ip_target_is_dialed_with_the_reactor_and_no_second_timer():
    """
    An IP target is dialed with connectTCP itself; while the setup timer
    (--connect-timeout from the accept) runs, the dial has no timer of
    its own: the setup timer always ends first.
    """
    reactor = MemoryReactorClock()
    _accept(_config(connect_timeout=5.0), reactor)

    ((host, port, _, timeout, _),) = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 8443)
    assert timeout is None
    assert len(reactor.getDelayedCalls()) == 1


def test_without_connect_timeout_the_dial_keeps_the_endpoints_limit():
    reactor = MemoryReactorClock()
    _accept(_config(connect_timeout=0.0), reactor)

    ((_, _, _, timeout, _),) = reactor.tcpClients
    assert timeout == 3600
    assert not reactor.getDelayedCalls()


def test_connect_timeout_cuts_a_dial_that_does_not_finish():
    """
    At --connect-timeout the dial is stopped and the accepted side cut,
    with the same log line and counter as before; the failure the stopped
    dial then reports is not logged as a second error.
    """
    reactor = MemoryReactorClock()
    tunnel, _, transport = _accept(_config(connect_timeout=2.0), reactor)
    (connector,) = reactor.connectors
    factory = reactor.tcpClients[0][2]

    with capturedLogs() as events:
        reactor.advance(1.9)
        assert not connector.stoppedConnecting
        reactor.advance(0.1)
        factory.clientConnectionFailed(connector, Failure(UserError()))

    assert connector.stoppedConnecting
    assert transport.disconnected
    assert tunnel.metrics.conn_timeout == 1
    assert _lines(events) == [
        "connection from 192.168.1.1:54321: timed out during connecting to "
        "127.0.0.1:8443 after 2.0s"
    ]


def test_refused_target_is_logged_and_the_accepted_side_closed():
    reactor = MemoryReactorClock()
    tunnel, splice, transport = _accept(_config(), reactor)
    (connector,) = reactor.connectors
    factory = reactor.tcpClients[0][2]

    with capturedLogs() as events:
        factory.clientConnectionFailed(
            connector, Failure(ConnectionRefusedError("111: Connection refused"))
        )

    assert transport.disconnecting
    assert splice._dial is None
    assert _lines(events) == [
        "connection from 192.168.1.1:54321 (not verified): cannot reach "
        "127.0.0.1:8443: Connection was refused by other side: 111: "
        "Connection refused."
    ]
    # The setup timer is left to the accepted side's end, as before.
    assert not tunnel.metrics.conn_timeout


def test_accepted_side_lost_while_dialing_stops_the_dial_quietly():
    reactor = MemoryReactorClock()
    _, splice, _ = _accept(_config(), reactor)
    (connector,) = reactor.connectors
    factory = reactor.tcpClients[0][2]

    with capturedLogs() as events:
        splice.inbound.connectionLost(None)
        factory.clientConnectionFailed(connector, Failure(UserError()))

    assert connector.stoppedConnecting
    assert not [line for line in _lines(events) if "cannot reach" in line]
    assert splice.finished


def test_unix_target_is_dialed_with_connect_unix():
    reactor = MemoryReactorClock()
    _accept(_config("unix:/tmp/gt-target.sock", connect_timeout=0.0), reactor)

    ((path, _, timeout, _),) = reactor.unixClients
    assert path == "/tmp/gt-target.sock"
    assert timeout == 3600
    assert not reactor.tcpClients


@pytest.mark.parametrize(
    "target, proxy",
    [
        ("localhost:8443", None),
        ("127.0.0.1:8443", "http://127.0.0.1:3128"),
        ("127.0.0.1:8443", "socks5://127.0.0.1:1080"),
    ],
)
def test_names_and_proxies_keep_the_endpoint(target, proxy):
    outbound_proxy = parse_proxy_url(proxy) if proxy else None
    config = _config(target, outbound_proxy=outbound_proxy)

    assert direct_dialer(config, MemoryReactorClock()) is None


def test_proxied_target_dials_the_proxy():
    reactor = MemoryReactorClock()
    _accept(_config(outbound_proxy=parse_proxy_url("http://127.0.0.1:3128")), reactor)

    ((host, port, _, _, _),) = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 3128)
