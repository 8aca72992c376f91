"""
Serve a web page over SPIFFE mutual TLS: the endpoint string does it all.

    SPIFFE_ENDPOINT_SOCKET=unix:///run/ghosttwist/backend.sock \
    python3 spiffe_site.py 'spiffe:tcp\\:8443\\:interface\\=127.0.0.1:allow=spiffe\\://domain.test/frontend'
"""

import sys

from twisted.internet import endpoints, reactor
from twisted.web import server, static

page = static.Data(b"hello over SPIFFE mTLS\n", "text/plain")
page.isLeaf = True
site = server.Site(page)
endpoints.serverFromString(reactor, sys.argv[1]).listen(site)
reactor.run()
