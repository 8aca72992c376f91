"""
A Twisted program that runs a client tunnel inside itself, then uses it.

    SPIFFE_ENDPOINT_SOCKET=unix:///run/ghosttwist/frontend.sock \
    python3 embed.py 127.0.0.1:8443

It listens on a free loopback port, forwards to the server tunnel given,
sends one line through and prints the reply.
"""

import os
import sys

from twisted.internet import defer, endpoints, protocol, task

from ghosttwist import (
    TunnelConfig,
    TunnelService,
    parse_address,
    parse_workload_api_address,
)


async def main(reactor, server: str) -> None:
    config = TunnelConfig(
        mode="client",
        listen=parse_address("127.0.0.1:0", flag="listen", allow_port_zero=True),
        target=parse_address(server, flag="target"),
        workload_api=parse_workload_api_address(os.environ["SPIFFE_ENDPOINT_SOCKET"]),
        allow_uris=("spiffe://domain.test/backend",),
    )
    tunnel = TunnelService(config, reactor)
    tunnel.startService()
    port = await tunnel.ready

    plain = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    reply = defer.Deferred()

    class OneLine(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"ping through an embedded tunnel\n")

        def dataReceived(self, data):
            reply.callback(data)
            self.transport.loseConnection()

    await endpoints.connectProtocol(plain, OneLine())
    print((await reply).decode().strip())
    await tunnel.stopService()


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1])))
