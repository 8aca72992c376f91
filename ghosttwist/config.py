"""
The tunnel's configuration as one immutable value.

The command line builds a L{TunnelConfig}; so can any Python program that
embeds the tunnel. Everything past this point reads only this value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from ghosttwist.addresses import Address, WorkloadApiAddress

if TYPE_CHECKING:
    from ghosttwist.status import StatusAddress

Mode = Literal["server", "client"]


@attrs.frozen
class TunnelConfig:
    """
    What one tunnel does: where it listens, where it forwards, who it
    trusts and whom it lets through.

    @ivar allow_uris: SPIFFE ID patterns; in server mode the clients allowed
        in (C{--allow-uri}), in client mode the servers accepted
        (C{--verify-uri}).
    @ivar workload_api: the Workload API address, or L{None} to read it from
        C{SPIFFE_ENDPOINT_SOCKET} when the tunnel starts.
    @ivar workload_api_timeout: seconds to wait for the first identity;
        0 waits forever.
    @ivar status: where the status port listens (C{--status}), or L{None}.
    @ivar target_status: a URL whose 2xx answer means the backend is up,
        instead of a TCP connect to the target.
    @ivar metrics_prefix: put before every metric name.
    @ivar metrics_graphite: a Graphite server metrics are pushed to.
    @ivar metrics_url: a URL metrics are POSTed to as JSON.
    @ivar metrics_interval: seconds between pushes.
    @ivar enable_shutdown: whether C{POST /_shutdown} stops the tunnel.
    """

    mode: Mode
    listen: Address
    target: Address
    workload_api: WorkloadApiAddress | None = None
    workload_api_timeout: float = 600.0
    allow_uris: tuple[str, ...] = ()
    allow_all: bool = False
    disable_authentication: bool = False
    connect_timeout: float = 10.0
    close_timeout: float = 1.0
    shutdown_timeout: float = 300.0
    status: StatusAddress | None = None
    target_status: str | None = None
    metrics_prefix: str = "ghosttwist"
    metrics_graphite: Address | None = None
    metrics_url: str | None = None
    metrics_interval: float = 30.0
    enable_shutdown: bool = False
