"""
ghosttwist: a SPIFFE-aware mutual TLS tunnel for Twisted.

The public API, for programs that embed the tunnel instead of running it
with twistd (see docs/embedding.md):

- L{TunnelConfig}: what one tunnel does, as an immutable value;
- L{TunnelService}: the tunnel as a Twisted service built from it;
- L{parse_address}, L{parse_workload_api_address}: the flags' address forms;
- L{SpiffeServerEndpoint}, L{SpiffeClientEndpoint}: SPIFFE mutual TLS as
  Twisted endpoints (also reachable as C{spiffe:} endpoint strings);
- L{Identity}, L{IIdentitySource}: identities and where they come from.

Names are imported on first use, so C{import ghosttwist} stays cheap.
Everything not listed here is private and may change.
"""

from __future__ import annotations

import importlib

from ghosttwist._version import __version__

_EXPORTS = {
    "TunnelConfig": "ghosttwist.config",
    "TunnelService": "ghosttwist.service",
    "StartupError": "ghosttwist.service",
    "Address": "ghosttwist.addresses",
    "WorkloadApiAddress": "ghosttwist.addresses",
    "InvalidAddress": "ghosttwist.addresses",
    "parse_address": "ghosttwist.addresses",
    "parse_workload_api_address": "ghosttwist.addresses",
    "SpiffeServerEndpoint": "ghosttwist.endpoints",
    "SpiffeClientEndpoint": "ghosttwist.endpoints",
    "Identity": "ghosttwist.identity",
    "IIdentitySource": "ghosttwist.identity",
    "Authorizer": "ghosttwist.auth.policy",
    "SpiffeIdPattern": "ghosttwist.auth.policy",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ghosttwist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
