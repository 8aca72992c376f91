"""
Listen and target addresses as the flags write them: C{HOST:PORT} and
C{unix:PATH}, and the Workload API address forms of the SPIFFE specification.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Literal
from urllib.parse import urlsplit

import attrs
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint


class InvalidAddress(ValueError):
    """
    An address flag that cannot be used; the message says how to write it.
    """


@attrs.frozen
class Address:
    """
    A stream address: a TCP host and port, or a unix socket path.
    """

    kind: Literal["tcp", "unix", "systemd"]
    host: str = ""
    port: int = 0
    path: str = ""
    name: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "systemd":
            return f"systemd:{self.name}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_local(self) -> bool:
        """
        Whether only this host can reach the address: a unix socket, a
        socket handed over by systemd, or localhost, 127.0.0.1 or [::1].
        """
        if self.kind != "tcp":
            return True
        return self.host in ("localhost", "127.0.0.1", "::1")

    @property
    def is_ip(self) -> bool:
        """
        Whether the host is an IP literal rather than a name.
        """
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def server_endpoint(self, reactor, backlog: int = 1024) -> IStreamServerEndpoint:
        """
        An endpoint that listens on this address, made the way
        L{ghosttwist.listeners} makes them (C{SO_REUSEPORT}, stale unix
        sockets removed, systemd sockets adopted).
        """
        from ghosttwist.listeners import server_endpoint

        return server_endpoint(self, reactor, backlog)

    def client_endpoint(self, reactor, timeout: float) -> IStreamClientEndpoint:
        """
        An endpoint that dials this address, giving up after C{timeout}.
        """
        timeout = timeout or 3600
        if self.kind == "unix":
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        if not self.is_ip:
            return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if ":" in self.host:
            return TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        return TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)


def parse_address(text: str, *, flag: str, allow_port_zero: bool = False) -> Address:
    """
    Parse C{HOST:PORT}, C{[IPV6]:PORT}, C{unix:PATH} or C{systemd:NAME}
    given to C{flag}.

    @raise InvalidAddress: with a one-line message naming the flag.
    """
    if text.startswith("systemd:"):
        name = text[len("systemd:"):]
        if not name or ":" in name:
            raise InvalidAddress(
                f"{flag} {text!r}: expected systemd:NAME, the socket unit's "
                "FileDescriptorName"
            )
        return Address("systemd", name=name)

    if text.startswith("launchd:"):
        raise InvalidAddress(
            f"{flag} {text!r}: launchd sockets are not supported; use "
            "systemd:NAME, unix:PATH or HOST:PORT"
        )

    if text.startswith("unix:"):
        return Address("unix", path=_unix_path(text, flag))

    if "://" in text:
        raise InvalidAddress(
            f"{flag} {text!r}: write HOST:PORT or unix:PATH, without a "
            "scheme such as tcp://"
        )

    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise InvalidAddress(
            f"{flag} {text!r}: expected HOST:PORT or unix:PATH"
        )

    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        _check_ipv6(flag, text, host)
    elif ":" in host:
        raise InvalidAddress(
            f"{flag} {text!r}: write an IPv6 address in brackets, as [::1]:8443"
        )

    _check_host(flag, text, host)
    if not _ascii_number(port_text) or not (0 <= int(port_text) <= 65535):
        raise InvalidAddress(f"{flag} {text!r}: the port must be a number from 1 to 65535")

    port = int(port_text)
    if port == 0 and not allow_port_zero:
        raise InvalidAddress(f"{flag} {text!r}: the port must be a number from 1 to 65535")

    return Address("tcp", host=host, port=port)


_UNIX_PATH_MAX = 107
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def _ascii_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _unix_path(text: str, flag: str) -> str:
    path = text[len("unix:"):]
    if not path:
        raise InvalidAddress(f"{flag} {text!r}: the unix socket path is empty")
    if path.startswith("//"):
        raise InvalidAddress(
            f"{flag} {text!r}: unix: takes a path, as unix:/run/app.sock; "
            "'//' would make part of it a host name"
        )
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise InvalidAddress(
            f"{flag} {text!r}: unix socket paths are limited to "
            f"{_UNIX_PATH_MAX} bytes"
        )
    return path


def _check_host(flag: str, text: str, host: str) -> None:
    """
    Refuse a host that is neither an IP address nor a well-formed DNS name,
    so the mistake is caught before anything listens.
    """
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass

    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    valid = (
        host.isascii()
        and 0 < len(name) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and not all(label.isdigit() for label in labels)
    )
    if not valid:
        raise InvalidAddress(
            f"{flag} {text!r}: {host!r} is neither an IP address nor a host name"
        )


def _check_ipv6(flag: str, text: str, host: str) -> None:
    if "%" in host:
        raise InvalidAddress(
            f"{flag} {text!r}: scoped IPv6 addresses (with %zone) are not supported"
        )
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise InvalidAddress(f"{flag} {text!r}: {host!r} is not an IPv6 address") from None


@attrs.frozen
class WorkloadApiAddress:
    """
    Where the SPIFFE Workload API listens: a unix socket or a TCP address.

    C{uri} is the normalized form the C{spiffe} package takes.
    """

    uri: str
    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return self.uri

    @property
    def grpc_target(self) -> str:
        """
        The address written the way grpcio dials it.
        """
        if self.kind == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"ipv6:[{self.host}]:{self.port}"
        return f"ipv4:{self.host}:{self.port}"


def parse_workload_api_address(text: str) -> WorkloadApiAddress:
    """
    Parse a Workload API address: C{unix:///path} or C{tcp://IP:PORT}.

    @raise InvalidAddress: with a one-line message that shows the right form.
    """
    if text.startswith("npipe:"):
        raise InvalidAddress(
            f"Workload API address {text!r}: Windows named pipes (npipe:) "
            "cannot be reached from this platform; use unix:///path or tcp://IP:PORT"
        )

    try:
        parts = urlsplit(text)
    except ValueError:
        raise InvalidAddress(
            f"Workload API address {text!r}: use unix:///path/to/agent.sock or "
            "tcp://IP:PORT"
        ) from None
    if parts.scheme == "unix":
        return _parse_unix_workload(text, parts)
    if parts.scheme == "tcp":
        return _parse_tcp_workload(text, parts)

    if text.startswith("/"):
        raise InvalidAddress(
            f"Workload API address {text!r}: write it as a URI, unix://{text}"
        )
    raise InvalidAddress(
        f"Workload API address {text!r}: use unix:///path/to/agent.sock or tcp://IP:PORT"
    )


def _parse_unix_workload(text: str, parts) -> WorkloadApiAddress:
    if parts.netloc:
        fixed = "unix:///" + parts.netloc + parts.path
        raise InvalidAddress(
            f"Workload API address {text!r}: {parts.netloc!r} stands where the "
            f"host goes, not the path; did you mean {fixed}?"
        )

    if (
        parts.query
        or parts.fragment
        or not parts.path.startswith("/")
        or parts.path.endswith("/")
    ):
        raise InvalidAddress(
            f"Workload API address {text!r}: expected unix:///absolute/path"
        )
    if len(os.fsencode(parts.path)) > _UNIX_PATH_MAX:
        raise InvalidAddress(
            f"Workload API address {text!r}: unix socket paths are limited to "
            f"{_UNIX_PATH_MAX} bytes"
        )

    return WorkloadApiAddress(uri=f"unix://{parts.path}", kind="unix", path=parts.path)


def _parse_tcp_workload(text: str, parts) -> WorkloadApiAddress:
    try:
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        port = None

    valid_ip = True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        valid_ip = False

    if not valid_ip or not port or parts.path not in ("", "/") or parts.query:
        raise InvalidAddress(
            f"Workload API address {text!r}: expected tcp://IP:PORT with an IP "
            "address, not a name"
        )

    return WorkloadApiAddress(uri=text, kind="tcp", host=host, port=port)
