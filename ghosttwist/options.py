"""
C{twistd ghosttwist server} and C{twistd ghosttwist client}: the flags,
named and defaulted as ghostunnel names and defaults them.

Each check here turns a user's mistake into one line before anything
listens; the result is a L{TunnelConfig} in C{self.config}.
"""

from __future__ import annotations

import os
import re
import socket

from twisted.python import usage

from ghosttwist.addresses import (
    InvalidAddress,
    parse_address,
    parse_workload_api_address,
)
from ghosttwist import fileoptions
from ghosttwist.auth.certnames import InvalidRule, UriRule
from ghosttwist.config import TunnelConfig
from ghosttwist.durations import InvalidDuration, parse_duration
from ghosttwist.outbound import InvalidProxyURL, parse_proxy_url

_QUIET = {
    "all": ("conns", "conn-errs", "handshake-errs"),
    "conns": ("conns",),
    "conn-errs": ("conn-errs",),
    "handshake-errs": ("handshake-errs",),
}

_PREFIX = re.compile(r"([A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)?")

_LOCAL = "localhost, 127.0.0.1, [::1], a unix socket or a systemd socket"


def _resolve(address, flag: str) -> None:
    """
    Fail with one line if the host name of C{address} does not resolve.
    """
    if address.kind != "tcp" or address.is_ip:
        return
    try:
        socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise usage.UsageError(
            f"{flag} {address}: cannot resolve {address.host!r} ({error}); "
            "--skip-resolve starts without resolving"
        ) from None


class _TunnelOptions(usage.Options):
    """
    Flags shared by both modes.
    """

    mode = ""
    uri_flag = ""

    optFlags = [
        ["use-workload-api", None,
         "Take the identity and trust bundles from the SPIFFE Workload API "
         "(address from SPIFFE_ENDPOINT_SOCKET)."],
        ["disable-authentication", None,
         "Server: ask no client certificate. Client: present none, and wait "
         "only for the trust bundle."],
        ["skip-resolve", None,
         "Do not resolve the target's host name at start-up (to start before "
         "DNS works); it is resolved per connection."],
        ["enable-shutdown", None,
         "Serve POST /_shutdown on the status port: a graceful stop, as SIGTERM."],
    ]

    optParameters = [
        ["listen", None, None,
         "Address to listen on: HOST:PORT, [IPV6]:PORT or unix:PATH."],
        ["target", None, None,
         "Address to forward to: HOST:PORT, [IPV6]:PORT or unix:PATH."],
        ["use-workload-api-addr", None, None,
         "Workload API address (unix:///path or tcp://IP:PORT); implies "
         "--use-workload-api."],
        ["use-workload-api-timeout", None, "10m",
         "How long to wait for the first X509-SVID at start-up (0 waits forever)."],
        ["connect-timeout", None, "10s",
         "Timeout for establishing connections and handshakes."],
        ["close-timeout", None, "1s",
         "Time to wait for the other direction after one side closes "
         "(0 closes at once)."],
        ["shutdown-timeout", None, "5m",
         "On SIGTERM or SIGINT, how long open connections may drain before "
         "they are cut."],
        ["max-concurrent-conns", None, "0",
         "Connections open at once; more wait to be accepted (0: no limit)."],
        ["max-conn-lifetime", None, "0s",
         "Close connections this long after they were set up (0: no limit)."],
        *fileoptions.FILE_PARAMETERS,
        ["status", None, None,
         "Status port: HOST:PORT or https://HOST:PORT (HTTPS with the tunnel's "
         "own certificate), http://HOST:PORT, unix:PATH or systemd:NAME."],
        ["target-status", None, None,
         "URL to GET for the backend check of /_status (2xx is healthy) "
         "instead of a TCP connect to --target."],
        ["metrics-prefix", None, "ghosttwist",
         "Prefix of every metric name ('ghostunnel' gives ghostunnel's names)."],
        ["metrics-graphite", None, None, "Push metrics to Graphite at HOST:PORT."],
        ["metrics-url", None, None, "POST metrics as JSON to this URL."],
        ["metrics-interval", None, "30s", "How often metrics are pushed."],
        ["workers", None, "1",
         "Processes sharing the listening socket, each with its own Workload "
         "API stream; crashed ones are restarted (1: this process alone)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.patterns: list[str] = []
        self.names: dict[str, list[str]] = {
            kind: [] for kind in ("cn", "ou", "dns", "ip", "spki-pin")
        }
        self.names["uri"] = self.patterns
        self.quiet: set[str] = set()

    def opt_quiet(self, value: str) -> None:
        """
        Leave out log lines: all, conns, conn-errs or handshake-errs.
        Repeatable.
        """
        if value not in _QUIET:
            raise usage.UsageError(
                f"--quiet {value!r}: choose all, conns, conn-errs or handshake-errs"
            )
        self.quiet.update(_QUIET[value])

    def postOptions(self) -> None:
        self._require("listen", "target")
        listen = self._address("listen", allow_port_zero=True)
        target = self._address("target")
        workload_api = self._workload_api()
        timeouts = {
            name.replace("-", "_"): self._duration(name)
            for name in (
                "use-workload-api-timeout",
                "connect-timeout",
                "close-timeout",
                "shutdown-timeout",
            )
        }
        self._check_authorization()
        network = self._network_options(listen, target)
        identity = fileoptions.identity_fields(
            self, self.mode, target, workload_api is not None
        )

        self.config = TunnelConfig(
            mode=self.mode,
            listen=listen,
            target=target,
            workload_api=workload_api,
            workload_api_timeout=timeouts["use_workload_api_timeout"],
            allow_uris=tuple(self.patterns) if workload_api else (),
            allow_all=bool(self.get("allow-all")),
            disable_authentication=bool(self["disable-authentication"]),
            connect_timeout=timeouts["connect_timeout"],
            close_timeout=timeouts["close_timeout"],
            shutdown_timeout=timeouts["shutdown_timeout"],
            max_conn_lifetime=self._duration("max-conn-lifetime"),
            quiet=frozenset(self.quiet),
            workers=self._workers(),
            **network,
            **identity,
            **self._monitoring(),
        )

    def _network_options(self, listen, target) -> dict:
        """
        Check the listen and target addresses against the safety rails,
        resolve names, and read the connection limit; returns further
        L{TunnelConfig} fields.
        """
        if target.kind == "systemd":
            raise usage.UsageError(
                f"--target {target}: systemd sockets can only be listened on"
            )
        self._check_rails(listen, target)

        text = self["max-concurrent-conns"]
        if not text.isdigit():
            raise usage.UsageError(
                f"--max-concurrent-conns {text!r}: expected a whole number "
                "(0: no limit)"
            )

        fields = self._mode_fields()
        if not self["skip-resolve"]:
            proxy = fields.get("outbound_proxy")
            if proxy is not None:
                _resolve(proxy.address, "--proxy")
            else:
                _resolve(target, "--target")
        return {"max_concurrent_conns": int(text), **fields}

    def _check_rails(self, listen, target) -> None:
        """
        Overridden by each mode: ghostunnel's localhost-only rules.
        """

    def _mode_fields(self) -> dict:
        """
        Overridden by each mode: its own L{TunnelConfig} fields.
        """
        return {}

    def _monitoring(self) -> dict:
        """
        Check the status port and metrics flags; returns their
        L{TunnelConfig} fields.
        """
        from ghosttwist.status import check_http_url, parse_status_address

        prefix = self["metrics-prefix"]
        if not _PREFIX.fullmatch(prefix):
            raise usage.UsageError(
                f"--metrics-prefix {prefix!r}: use letters, digits, '_', '-' and '.'"
            )
        interval = self._duration("metrics-interval")
        if interval <= 0:
            raise usage.UsageError("--metrics-interval must be longer than 0s")
        for name in ("status", "target-status", "metrics-url", "metrics-graphite"):
            if self[name] == "":
                raise usage.UsageError(f"--{name} needs a value")
        if self["enable-shutdown"] and not self["status"]:
            raise usage.UsageError("--enable-shutdown needs --status")

        try:
            status = parse_status_address(self["status"]) if self["status"] else None
            target_status = self["target-status"] and check_http_url(
                self["target-status"], "--target-status"
            )
            metrics_url = self["metrics-url"] and check_http_url(
                self["metrics-url"], "--metrics-url"
            )
            graphite = self["metrics-graphite"] and parse_address(
                self["metrics-graphite"], flag="--metrics-graphite"
            )
        except InvalidAddress as error:
            raise usage.UsageError(str(error)) from None

        return {
            "status": status,
            "target_status": target_status or None,
            "metrics_prefix": prefix,
            "metrics_graphite": graphite or None,
            "metrics_url": metrics_url or None,
            "metrics_interval": interval,
            "enable_shutdown": bool(self["enable-shutdown"]),
        }

    def _workers(self) -> int:
        text = self["workers"]
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 64:
            raise usage.UsageError(
                f"--workers {text!r}: expected a whole number from 1 to 64"
            )
        status = self["status"]
        if int(text) > 1 and status and status.startswith(("unix:", "systemd:")):
            raise usage.UsageError(
                f"--status {status}: with --workers each worker serves the "
                "status port, so it must be a TCP address"
            )
        return int(text)

    def _require(self, *names: str) -> None:
        for name in names:
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")

    def _address(self, name: str, allow_port_zero: bool = False):
        try:
            return parse_address(
                self[name], flag=f"--{name}", allow_port_zero=allow_port_zero
            )
        except InvalidAddress as error:
            raise usage.UsageError(str(error)) from None

    def _duration(self, name: str) -> float:
        try:
            return parse_duration(self[name])
        except InvalidDuration as error:
            raise usage.UsageError(f"--{name}: {error}") from None

    def _workload_api(self):
        fileoptions.apply_environment(self)
        files = fileoptions.given_files(self)
        wants_workload = self["use-workload-api"] or self["use-workload-api-addr"]

        if files and wants_workload:
            raise usage.UsageError(
                f"{files[0]} and the Workload API are two sources of identity; "
                "choose one"
            )
        if not wants_workload:
            return None

        text = self["use-workload-api-addr"] or os.environ.get("SPIFFE_ENDPOINT_SOCKET")
        if not text:
            raise usage.UsageError(
                "--use-workload-api needs SPIFFE_ENDPOINT_SOCKET set, or "
                "--use-workload-api-addr"
            )
        try:
            return parse_workload_api_address(text)
        except InvalidAddress as error:
            raise usage.UsageError(str(error)) from None

    def _add_pattern(self, value: str) -> None:
        try:
            UriRule.parse(value)
        except InvalidRule as error:
            raise usage.UsageError(f"{self.uri_flag} {value!r}: {error}") from None
        self.patterns.append(value)

    def _add_name(self, kind: str, value: str) -> None:
        if not value:
            raise usage.UsageError(f"{self.uri_flag[:-4]}-{kind}: an empty value")
        self.names[kind].append(value)

    def _check_authorization(self) -> None:
        """
        Overridden by each mode with ghostunnel's rules.
        """


class ServerOptions(_TunnelOptions):
    """
    C{twistd ghosttwist server}: accept mutual TLS on C{--listen}, forward
    plain bytes to C{--target}.
    """

    mode = "server"
    uri_flag = "--allow-uri"
    synopsis = "--listen ADDR --target ADDR --use-workload-api --allow-uri ID"

    optFlags = [
        ["allow-all", None,
         "Allow every client whose certificate verifies, whatever its ID."],
        ["unsafe-target", None,
         "Allow a target other than localhost, 127.0.0.1, [::1] or a unix socket."],
        ["proxy-protocol", None,
         "Send a PROXY protocol v2 header to the target (--proxy-protocol-mode conn)."],
    ]

    optParameters = [
        ["allow-policy", None, None,
         "Rego policy (.rego file, folder or OPA bundle) clients may pass."],
        ["allow-query", None, None, "Query of --allow-policy, e.g. data.tunnel.allow."],
        ["proxy-protocol-mode", None, None,
         "PROXY protocol v2 header: conn (addresses), tls (also TLS version, "
         "ALPN, SNI), tls-full (also the client certificate)."],
    ]

    def _check_rails(self, listen, target) -> None:
        if not target.is_local and not self["unsafe-target"]:
            raise usage.UsageError(
                f"--target {target}: server mode forwards only to {_LOCAL}; "
                "--unsafe-target allows others"
            )

    def _mode_fields(self) -> dict:
        mode = self["proxy-protocol-mode"]
        if mode is not None and self["proxy-protocol"]:
            raise usage.UsageError(
                "--proxy-protocol and --proxy-protocol-mode exclude each other"
            )
        if mode is not None and mode not in ("conn", "tls", "tls-full"):
            raise usage.UsageError(
                f"--proxy-protocol-mode {mode!r}: choose conn, tls or tls-full"
            )
        if self["proxy-protocol"]:
            mode = "conn"
        return {"proxy_protocol": mode or ""}

    def opt_allow_uri(self, value: str) -> None:
        """Allow clients with this SPIFFE ID, repeatable (* one segment, ** rest)."""
        self._add_pattern(value)

    def opt_allow_cn(self, value: str) -> None:
        """
        Allow clients whose subject has this common name. Repeatable.
        """
        self._add_name("cn", value)

    def opt_allow_ou(self, value: str) -> None:
        """
        Allow clients whose subject has this organizational unit. Repeatable.
        """
        self._add_name("ou", value)

    def opt_allow_dns(self, value: str) -> None:
        """
        Allow clients with this DNS SAN (compared, not looked up). Repeatable.
        """
        self._add_name("dns", value)

    def opt_allow_ip(self, value: str) -> None:
        """
        Allow clients with this IP SAN. Repeatable.
        """
        self._add_name("ip", value)

    def opt_allow_spki_pin(self, value: str) -> None:
        """
        Allow clients whose public key hashes to ALGO:BASE64 (sha256, sha384,
        sha512); the pin alone authenticates them. Repeatable.
        """
        self._add_name("spki-pin", value)


class ClientOptions(_TunnelOptions):
    """
    C{twistd ghosttwist client}: accept plain bytes on C{--listen}, forward
    them over mutual TLS to C{--target}.
    """

    mode = "client"
    uri_flag = "--verify-uri"
    synopsis = "--listen ADDR --target ADDR --use-workload-api --verify-uri ID"

    optFlags = [
        ["unsafe-listen", None,
         "Allow listening on other than localhost, 127.0.0.1, [::1] or a unix "
         "socket."],
    ]

    optParameters = [
        ["proxy", None, None,
         "Reach the target through this proxy: http://[USER:PASS@]HOST:PORT "
         "(CONNECT) or socks5://[USER:PASS@]HOST:PORT."],
        ["override-server-name", None, None,
         "Check the server's certificate against this name, and send it as "
         "SNI, instead of the --target host."],
        ["verify-policy", None, None,
         "Rego policy (.rego file, folder or OPA bundle) the server must pass."],
        ["verify-query", None, None,
         "Query of --verify-policy, e.g. data.tunnel.allow."],
    ]

    def _check_rails(self, listen, target) -> None:
        if not listen.is_local and not self["unsafe-listen"]:
            raise usage.UsageError(
                f"--listen {listen}: client mode listens only on {_LOCAL}; "
                "--unsafe-listen allows others"
            )
        if target.kind != "tcp" and self["proxy"]:
            raise usage.UsageError(
                f"--proxy needs a HOST:PORT target, not {target}"
            )

    def _mode_fields(self) -> dict:
        if not self["proxy"]:
            return {}
        try:
            return {"outbound_proxy": parse_proxy_url(self["proxy"])}
        except InvalidProxyURL as error:
            raise usage.UsageError(str(error)) from None

    def opt_verify_uri(self, value: str) -> None:
        """Accept a server with this SPIFFE ID, repeatable (* one segment, ** rest)."""
        self._add_pattern(value)

    def opt_verify_cn(self, value: str) -> None:
        """
        Accept a server only with this common name (any --verify-* may
        match). Repeatable.
        """
        self._add_name("cn", value)

    def opt_verify_ou(self, value: str) -> None:
        """
        Accept a server only with this organizational unit. Repeatable.
        """
        self._add_name("ou", value)

    def opt_verify_dns(self, value: str) -> None:
        """
        Accept a server only with this DNS SAN. Repeatable.
        """
        self._add_name("dns", value)

    def opt_verify_ip(self, value: str) -> None:
        """
        Accept a server only with this IP SAN. Repeatable.
        """
        self._add_name("ip", value)

    def opt_verify_spki_pin(self, value: str) -> None:
        """
        Accept a server only if its public key hashes to ALGO:BASE64; the pin
        replaces chain and host name checks. Repeatable.
        """
        self._add_name("spki-pin", value)
