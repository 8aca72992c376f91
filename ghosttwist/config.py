"""
The tunnel's configuration as one immutable value.

The command line builds a L{TunnelConfig}; so can any Python program that
embeds the tunnel. Everything past this point reads only this value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from ghosttwist.addresses import Address, WorkloadApiAddress
from ghosttwist.auth.certnames import NameRules
from ghosttwist.files import IdentityFiles
from ghosttwist.outbound import ProxyURL

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
    @ivar files: identity files (C{--keystore} or C{--cert}/C{--key}, and
        C{--cacert}), or L{None} with the Workload API.
    @ivar timed_reload: with files, seconds between reloads; 0 for none.
    @ivar names: with files, the name and SPKI pin rules peers must meet
        (C{--allow-cn}..., C{--verify-cn}...).
    @ivar policy: with files, a Rego policy path and query, or L{None}.
    @ivar server_name: client mode with files: the name the server's
        certificate must be valid for, and the SNI sent; L{None} takes the
        target's host.
    @ivar max_tls_version: C{"TLS1.2"} or C{"TLS1.3"}.
    @ivar alpn: ALPN protocols in order of preference; empty leaves ALPN off.
    @ivar max_concurrent_conns: connections open at once; past it new ones
        wait to be accepted. 0 is no limit.
    @ivar max_conn_lifetime: seconds after which a spliced connection is
        closed; 0 is no limit.
    @ivar proxy_protocol: server mode: the PROXY protocol v2 header sent to
        the target (C{conn}, C{tls}, C{tls-full}), or C{""} for none.
    @ivar outbound_proxy: client mode: the proxy the target is reached
        through, or L{None}.
    @ivar quiet: log lines to leave out: C{conns}, C{conn-errs},
        C{handshake-errs} (C{all} stands for the three).
    @ivar status: where the status port listens (C{--status}), or L{None}.
    @ivar target_status: a URL whose 2xx answer means the backend is up,
        instead of a TCP connect to the target.
    @ivar metrics_prefix: put before every metric name.
    @ivar metrics_graphite: a Graphite server metrics are pushed to.
    @ivar metrics_url: a URL metrics are POSTed to as JSON.
    @ivar metrics_interval: seconds between pushes.
    @ivar enable_shutdown: whether C{POST /_shutdown} stops the tunnel.
    @ivar workers: under twistd, processes sharing the listening socket;
        1 runs the tunnel in the twistd process itself.
    """

    mode: Mode
    listen: Address
    target: Address
    workload_api: WorkloadApiAddress | None = None
    workload_api_timeout: float = 600.0
    allow_uris: tuple[str, ...] = ()
    allow_all: bool = False
    disable_authentication: bool = False
    files: IdentityFiles | None = None
    timed_reload: float = 0.0
    names: NameRules = attrs.field(factory=NameRules)
    policy: tuple[str, str] | None = None
    server_name: str | None = None
    max_tls_version: str = "TLS1.3"
    alpn: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    close_timeout: float = 1.0
    shutdown_timeout: float = 300.0
    max_concurrent_conns: int = 0
    max_conn_lifetime: float = 0.0
    proxy_protocol: Literal["", "conn", "tls", "tls-full"] = ""
    outbound_proxy: ProxyURL | None = None
    quiet: frozenset[str] = frozenset()
    status: StatusAddress | None = None
    target_status: str | None = None
    metrics_prefix: str = "ghosttwist"
    metrics_graphite: Address | None = None
    metrics_url: str | None = None
    metrics_interval: float = 30.0
    enable_shutdown: bool = False
    workers: int = 1
