"""
C{twistd ghosttwist server} and C{twistd ghosttwist client}: the flags,
named and defaulted as ghostunnel names and defaults them.

Each check here turns a user's mistake into one line before anything
listens; the result is a L{TunnelConfig} in C{self.config}.
"""

from __future__ import annotations

import os
import re

from twisted.python import usage

from ghosttwist.addresses import (
    InvalidAddress,
    parse_address,
    parse_workload_api_address,
)
from ghosttwist.auth.policy import InvalidPattern, SpiffeIdPattern
from ghosttwist.config import TunnelConfig
from ghosttwist.durations import InvalidDuration, parse_duration

_FILE_FLAGS = ("keystore", "cert", "key", "cacert")

_PREFIX = re.compile(r"([A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)?")


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
         "Server: ask no client certificate. Client: present none."],
        ["enable-shutdown", None,
         "Serve POST /_shutdown on the status port: a graceful stop, as SIGTERM."],
    ]

    optParameters = [
        ["listen", None, None, "Address to listen on: HOST:PORT or unix:PATH."],
        ["target", None, None, "Address to forward to: HOST:PORT or unix:PATH."],
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
         "On SIGTERM, how long open connections may drain before they are cut."],
        ["keystore", None, None, "Certificate and key file (not yet available)."],
        ["cert", None, None, "Certificate file (not yet available)."],
        ["key", None, None, "Private key file (not yet available)."],
        ["cacert", None, None, "CA bundle file (not yet available)."],
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self.patterns: list[str] = []

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

        self.config = TunnelConfig(
            mode=self.mode,
            listen=listen,
            target=target,
            workload_api=workload_api,
            workload_api_timeout=timeouts["use_workload_api_timeout"],
            allow_uris=tuple(self.patterns),
            allow_all=bool(self.get("allow-all")),
            disable_authentication=bool(self["disable-authentication"]),
            connect_timeout=timeouts["connect_timeout"],
            close_timeout=timeouts["close_timeout"],
            shutdown_timeout=timeouts["shutdown_timeout"],
            **self._monitoring(),
        )

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
        files = [f"--{name}" for name in _FILE_FLAGS if self[name]]
        wants_workload = self["use-workload-api"] or self["use-workload-api-addr"]

        if files and wants_workload:
            raise usage.UsageError(
                f"{files[0]} and the Workload API are two sources of identity; "
                "choose one"
            )
        if files:
            raise usage.UsageError(
                f"{files[0]}: identities from files are not available yet; "
                "use --use-workload-api"
            )
        if not wants_workload:
            raise usage.UsageError(
                "no identity: give --use-workload-api (or --use-workload-api-addr)"
            )

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
            SpiffeIdPattern.parse(value)
        except InvalidPattern as error:
            raise usage.UsageError(f"{self.uri_flag} {value!r}: {error}") from None
        self.patterns.append(value)

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
    ]

    def opt_allow_uri(self, value: str) -> None:
        """
        Allow clients with this SPIFFE ID; '*' matches one path segment and a
        trailing '**' any number. Repeatable.
        """
        self._add_pattern(value)

    def _check_authorization(self) -> None:
        chosen = [
            flag
            for flag, given in (
                ("--allow-all", self["allow-all"]),
                ("--allow-uri", bool(self.patterns)),
                ("--disable-authentication", self["disable-authentication"]),
            )
            if given
        ]
        if not chosen:
            raise usage.UsageError(
                "server mode needs an authorization flag: --allow-uri, "
                "--allow-all or --disable-authentication"
            )
        if len(chosen) > 1:
            raise usage.UsageError(f"{chosen[0]} and {chosen[1]} exclude each other")


class ClientOptions(_TunnelOptions):
    """
    C{twistd ghosttwist client}: accept plain bytes on C{--listen}, forward
    them over mutual TLS to C{--target}.
    """

    mode = "client"
    uri_flag = "--verify-uri"
    synopsis = "--listen ADDR --target ADDR --use-workload-api --verify-uri ID"

    def opt_verify_uri(self, value: str) -> None:
        """
        Accept a server only with this SPIFFE ID; '*' matches one path segment
        and a trailing '**' any number. Repeatable.
        """
        self._add_pattern(value)
