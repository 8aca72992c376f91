"""
The twistd plugin: C{twistd ghosttwist server|client|dev-agent}.

This module only names the plugin; everything it does lives in
L{ghosttwist.cli}, imported when twistd asks for it.
"""

from twisted.application.service import ServiceMaker

ghosttwist = ServiceMaker(
    "ghosttwist",
    "ghosttwist.cli",
    "SPIFFE-aware mutual TLS tunnel (server and client modes)",
    "ghosttwist",
)
