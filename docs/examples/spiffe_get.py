"""
Fetch a page over SPIFFE mutual TLS with Twisted's web client (Agent),
dialing through a C{spiffe:} client endpoint string.

    SPIFFE_ENDPOINT_SOCKET=unix:///run/ghosttwist/frontend.sock \
    python3 spiffe_get.py 'spiffe:tcp\\:127.0.0.1\\:8443:verify=spiffe\\://domain.test/backend'
"""

import sys

from twisted.internet import defer, endpoints, task
from twisted.web.client import Agent, readBody


class _SpiffeEndpoints:
    """
    Dial every request's host through the endpoint string given.
    """

    def __init__(self, reactor, description: str) -> None:
        self._endpoint = endpoints.clientFromString(reactor, description)

    def endpointForURI(self, uri):
        return self._endpoint


async def main(reactor, description: str) -> None:
    agent = Agent.usingEndpointFactory(reactor, _SpiffeEndpoints(reactor, description))
    response = await agent.request(b"GET", b"http://backend/")
    body = await readBody(response)
    print(response.code, body.decode().strip())


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1])))
