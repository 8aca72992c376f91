"""
C{twistd ghosttwist dev-agent}: its flags, and every check they need.

All the files named on the command line are read here, before twistd forks
and before anything listens, so that a mistake ends in one line and exit
status 2 instead of a half-started agent.
"""

from __future__ import annotations

import datetime
import os
import socket
import stat
from typing import ClassVar

from twisted.python import usage

from ghosttwist.devagent.agent import AgentConfig
from ghosttwist.devagent.ca import CAError, load_bundle, load_ca
from ghosttwist.durations import InvalidDuration, parse_duration
from ghosttwist.spiffeid import InvalidSpiffeId, parse_spiffe_id

#: The longest unix socket path Linux can bind (sun_path less its NUL).
_MAX_SOCKET_PATH = 107


class DevAgentOptions(usage.Options):
    """
    Flags of the development Workload API server.

    After parsing, C{self.config} holds the checked L{AgentConfig}.
    """

    synopsis = "--trust-domain TD --workload PATH=SPIFFE_ID [--workload ...] [options]"

    optParameters: ClassVar[list[list[str | None]]] = [
        ["trust-domain", None, None, "trust domain of the CA and every SVID"],
        ["svid-ttl", None, "1h", "lifetime of each X509-SVID"],
        ["ca-ttl", None, "24h", "lifetime of each generated CA"],
        ["ca", None, None, "PEM CA certificate to sign with (needs --ca-key)"],
        ["ca-key", None, None, "PEM private key of --ca (unencrypted)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["workload"] = []
        self["federate-with"] = []
        self.config: AgentConfig | None = None

    def opt_workload(self, value: str) -> None:
        """
        Serve SPIFFE_ID on the unix socket PATH (PATH=SPIFFE_ID; repeatable).
        """
        self["workload"].append(value)

    def opt_federate_with(self, value: str) -> None:
        """
        Also send the CAs of a foreign trust domain (TD=BUNDLE.pem; repeatable).
        """
        self["federate-with"].append(value)

    def postOptions(self) -> None:
        trust_domain = _trust_domain(self["trust-domain"])
        svid_ttl = _ttl("--svid-ttl", self["svid-ttl"])
        ca_ttl = _ttl("--ca-ttl", self["ca-ttl"])
        if ca_ttl <= svid_ttl and not self["ca"]:
            raise usage.UsageError(
                f"--ca-ttl {self['ca-ttl']} must be longer than --svid-ttl "
                f"{self['svid-ttl']}: a CA cannot sign SVIDs that outlive it"
            )
        workloads = _workloads(self["workload"], trust_domain)
        federated = _federations(self["federate-with"], trust_domain)
        ca = _given_ca(self["ca"], self["ca-key"])

        self.config = AgentConfig(
            trust_domain=trust_domain,
            workloads=workloads,
            svid_ttl=svid_ttl,
            ca_ttl=ca_ttl,
            federated=federated,
            ca=ca,
        )


def _trust_domain(value: str | None) -> str:
    if value is None:
        raise usage.UsageError("--trust-domain is required")

    try:
        spiffe_id = parse_spiffe_id(f"spiffe://{value}")
    except InvalidSpiffeId:
        spiffe_id = None
    if spiffe_id is None or "/" in value:
        raise usage.UsageError(
            f"--trust-domain {value!r} is not a trust domain name: use lower-case "
            "letters, digits, '.', '-' and '_' only"
        )
    return value


def _ttl(flag: str, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except InvalidDuration as error:
        raise usage.UsageError(f"{flag}: {error}") from None

    if seconds < 1:
        raise usage.UsageError(f"{flag} must be at least 1s, not {value!r}")
    return seconds


def _workloads(values: list[str], trust_domain: str) -> dict[str, str]:
    if not values:
        raise usage.UsageError("give at least one --workload PATH=SPIFFE_ID")

    workloads: dict[str, str] = {}
    for value in values:
        path, equals, text = value.rpartition("=")
        if not equals or not path:
            raise usage.UsageError(f"--workload {value!r}: expected PATH=SPIFFE_ID")

        try:
            spiffe_id = parse_spiffe_id(text)
        except InvalidSpiffeId as error:
            raise usage.UsageError(f"--workload: {error}") from None
        if str(spiffe_id.trust_domain) != trust_domain:
            raise usage.UsageError(
                f"--workload: {text} is not in the trust domain {trust_domain}"
            )

        path = os.path.abspath(path)
        if path in workloads:
            raise usage.UsageError(f"--workload: {path} is given twice")
        _check_socket_path(path)
        workloads[path] = text
    return workloads


def _check_socket_path(path: str) -> None:
    if len(path.encode()) > _MAX_SOCKET_PATH:
        raise usage.UsageError(
            f"--workload: the socket path {path} is longer than "
            f"{_MAX_SOCKET_PATH} bytes; choose a shorter one"
        )

    _check_parent_writable(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise usage.UsageError(
            f"--workload: {path} exists and is not a socket; not replacing it"
        )

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return
    finally:
        probe.close()
    raise usage.UsageError(
        f"--workload: {path} is in use by another server; stop it first"
    )


def _check_parent_writable(path: str) -> None:
    """
    Refuse a socket path whose folder we could neither find nor create.
    """
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise usage.UsageError(
            f"--workload: cannot create the socket {path}: "
            f"{folder} is not a writable folder"
        )


def _federations(values: list[str], trust_domain: str) -> dict:
    federated = {}
    for value in values:
        domain, equals, path = value.partition("=")
        if not equals or not path:
            raise usage.UsageError(
                f"--federate-with {value!r}: expected TRUST_DOMAIN=BUNDLE.pem"
            )
        domain = _trust_domain_of_flag("--federate-with", domain)
        if domain == trust_domain:
            raise usage.UsageError(f"--federate-with: {domain} is our own trust domain")
        if domain in federated:
            raise usage.UsageError(f"--federate-with: {domain} is given twice")

        try:
            federated[domain] = load_bundle(_read("--federate-with", path))
        except CAError as error:
            raise usage.UsageError(f"--federate-with {path}: {error}") from None
    return federated


def _trust_domain_of_flag(flag: str, value: str) -> str:
    try:
        return _trust_domain(value)
    except usage.UsageError:
        raise usage.UsageError(
            f"{flag}: {value!r} is not a trust domain name"
        ) from None


def _given_ca(certificate_path: str | None, key_path: str | None):
    if certificate_path is None and key_path is None:
        return None
    if certificate_path is None or key_path is None:
        raise usage.UsageError("--ca and --ca-key go together: give both or neither")

    now = datetime.datetime.now(datetime.UTC)
    try:
        return load_ca(
            _read("--ca", certificate_path), _read("--ca-key", key_path), now
        )
    except CAError as error:
        raise usage.UsageError(f"--ca {certificate_path}: {error}") from None


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise usage.UsageError(
            f"{flag}: cannot read {path}: {error.strerror}"
        ) from None
