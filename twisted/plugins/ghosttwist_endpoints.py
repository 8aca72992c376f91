"""
The C{spiffe:} endpoint-string prefix, for serverFromString and
clientFromString; the work is done in L{ghosttwist.endpoints}.
"""

from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(
    IPlugin,
    IStreamServerEndpointStringParser,
    IStreamClientEndpointStringParserWithReactor,
)
class _SpiffeEndpointParser:
    """
    Parses C{spiffe:WRAPPED-ENDPOINT:key=value:...} descriptions.
    """

    prefix = "spiffe"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from ghosttwist.endpoints import parse_server

        return parse_server(reactor, *args, **kwargs)

    def parseStreamClient(self, reactor, *args, **kwargs):
        from ghosttwist.endpoints import parse_client

        return parse_client(reactor, *args, **kwargs)


spiffeEndpointParser = _SpiffeEndpointParser()
