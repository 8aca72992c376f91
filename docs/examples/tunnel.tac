"""
A server tunnel configured in Python and run by twistd:

    twistd -ny tunnel.tac

The values below are the quickstart's; the environment variables let the
test suite (and you) point it elsewhere without editing the file.
"""

import os

from twisted.application import service

from ghosttwist import (
    TunnelConfig,
    TunnelService,
    parse_address,
    parse_workload_api_address,
)

config = TunnelConfig(
    mode="server",
    listen=parse_address(os.environ.get("LISTEN", "127.0.0.1:8443"), flag="listen"),
    target=parse_address(os.environ.get("TARGET", "127.0.0.1:8080"), flag="target"),
    workload_api=parse_workload_api_address(
        os.environ.get("WORKLOAD_API", "unix:///run/ghosttwist/backend.sock")
    ),
    allow_uris=("spiffe://domain.test/frontend",),
)

application = service.Application("ghosttwist")
TunnelService(config).setServiceParent(application)
