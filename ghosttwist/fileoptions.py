"""
The flags of identities from files and of certificate access control, as
ghostunnel names them, checked and turned into L{TunnelConfig} fields.

ghostunnel's rules, each refused with one line: in server mode the name
flags (C{--allow-cn}, C{-ou}, C{-dns}, C{-ip}, C{-uri}) and C{--allow-policy}
combine (any one match lets a client in), while C{--allow-all},
C{--disable-authentication} and C{--allow-spki-pin} each stand alone. In
client mode the C{--verify-*} flags combine in the same way on top of the
host name check, and C{--verify-spki-pin} replaces all of it (it may go with
C{--disable-authentication}). Name, pin and policy flags need identities
from files: with the Workload API peers are judged by SPIFFE ID only.
"""

from __future__ import annotations

import os

from twisted.python import usage

from ghosttwist.auth.certnames import InvalidRule, NameRules
from ghosttwist.auth.policy import InvalidPattern, SpiffeIdPattern
from ghosttwist.auth.rego import PolicyError, RegoPolicy
from ghosttwist.files import FileIdentityError, IdentityFiles, load_identity

ENVIRONMENT = {
    "keystore": "KEYSTORE_PATH",
    "cert": "CERT_PATH",
    "key": "KEY_PATH",
    "storepass": "KEYSTORE_PASS",
    "cacert": "CACERT_PATH",
}
"""
Environment variables that stand in for flags not given, as in ghostunnel.
"""

FILE_PARAMETERS = [
    ["keystore", None, None,
     "PEM (chain and key, any order) or PKCS#12 file with the identity "
     "[$KEYSTORE_PATH]."],
    ["cert", None, None, "PEM certificate chain, with --key [$CERT_PATH]."],
    ["key", None, None, "PEM private key for --cert [$KEY_PATH]."],
    ["storepass", None, None,
     "Password of the PKCS#12 keystore or encrypted key [$KEYSTORE_PASS]."],
    ["cacert", None, None,
     "PEM bundle of CAs to trust (default: the system trust store) "
     "[$CACERT_PATH]."],
    ["timed-reload", None, "0s",
     "Also reload the files (and policy) this often; 0 only on SIGUSR1/SIGHUP."],
    ["max-tls-version", None, "TLS1.3", "Highest TLS version: TLS1.2 or TLS1.3."],
    ["alpn", None, None,
     "ALPN protocols, comma-separated, in order of preference (e.g. "
     "h2,http/1.1); unset, ALPN is off."],
]
"""
C{optParameters} rows shared by both modes.
"""

_MODES = {
    "server": {
        "flag": "--allow",
        "policy": ("allow-policy", "allow-query"),
        "alone": ("--allow-all", "--disable-authentication", "--allow-spki-pin"),
    },
    "client": {
        "flag": "--verify",
        "policy": ("verify-policy", "verify-query"),
        "alone": ("--verify-spki-pin",),
    },
}
_VERSIONS = {"TLS1.2": "TLS1.2", "TLS1.3": "TLS1.3", "1.2": "TLS1.2", "1.3": "TLS1.3"}


def apply_environment(options: usage.Options) -> None:
    """
    Fill file flags that were not given from ghostunnel's variables.
    """
    for name, variable in ENVIRONMENT.items():
        if not options[name] and os.environ.get(variable):
            options[name] = os.environ[variable]


def given_files(options: usage.Options) -> list[str]:
    """
    The file flags given (or set through the environment), as C{--name}.
    """
    return [f"--{n}" for n in ("keystore", "cert", "key", "cacert") if options[n]]


def _given(options, mode: str) -> dict[str, bool]:
    prefix = _MODES[mode]["flag"]
    names = options.names
    given = {
        f"{prefix}-{kind}": bool(names[kind])
        for kind in ("cn", "ou", "dns", "ip", "uri", "spki-pin")
    }
    given[f"--{_MODES[mode]['policy'][0]}"] = bool(options[_MODES[mode]["policy"][0]])
    if mode == "server":
        given["--allow-all"] = bool(options["allow-all"])
        given["--disable-authentication"] = bool(options["disable-authentication"])
    return given


def check_access_flags(options, mode: str, workload_api: bool) -> None:
    """
    Refuse combinations ghostunnel refuses, and flags the identity source
    cannot serve.
    """
    given = _given(options, mode)
    chosen = [flag for flag, present in given.items() if present]
    alone = [flag for flag in chosen if flag in _MODES[mode]["alone"]]
    prefix = _MODES[mode]["flag"]

    if mode == "server" and not chosen:
        raise usage.UsageError(
            "server mode needs an authorization flag: --allow-cn, --allow-ou, "
            "--allow-dns, --allow-ip, --allow-uri, --allow-spki-pin, "
            "--allow-policy, --allow-all or --disable-authentication"
        )
    if alone and len(chosen) > 1:
        other = next(flag for flag in chosen if flag != alone[0])
        raise usage.UsageError(f"{alone[0]} and {other} exclude each other")

    policy, query = _MODES[mode]["policy"]
    if bool(options[policy]) != bool(options[query]):
        raise usage.UsageError(f"--{policy} and --{query} go together")

    if workload_api:
        needs_files = [
            flag
            for flag in chosen
            if flag not in (f"{prefix}-uri", "--allow-all", "--disable-authentication")
        ]
        if needs_files:
            raise usage.UsageError(
                f"{needs_files[0]} needs identities from files (--keystore, or "
                f"--cert and --key); with the Workload API, use {prefix}-uri"
            )
        for text in options.patterns:
            try:
                SpiffeIdPattern.parse(text)
            except InvalidPattern as error:
                raise usage.UsageError(f"{prefix}-uri {text!r}: {error}") from None


def _rules(options, mode: str) -> NameRules:
    names = options.names
    try:
        return NameRules(
            common_names=names["cn"],
            organizational_units=names["ou"],
            dns_names=names["dns"],
            ip_addresses=names["ip"],
            uris=names["uri"],
            pins=names["spki-pin"],
        )
    except InvalidRule as error:
        raise usage.UsageError(f"{_MODES[mode]['flag']}-*: {error}") from None


def _identity_files(options, mode: str) -> IdentityFiles:
    if options["keystore"] and (options["cert"] or options["key"]):
        raise usage.UsageError("--keystore and --cert/--key exclude each other")
    if bool(options["cert"]) != bool(options["key"]):
        raise usage.UsageError("--cert and --key go together")

    presents = options["keystore"] or options["cert"]
    anonymous_client = mode == "client" and options["disable-authentication"]
    if not presents and not anonymous_client:
        raise usage.UsageError(
            "no identity: give --keystore, --cert and --key, or --use-workload-api"
        )

    if anonymous_client:
        return IdentityFiles(cacert=options["cacert"])
    return IdentityFiles(
        keystore=options["keystore"],
        cert=options["cert"],
        key=options["key"],
        cacert=options["cacert"],
        password=options["storepass"],
    )


def _server_name(options, mode: str, target, rules: NameRules) -> str | None:
    if mode != "client" or rules.pins:
        return None
    if options["override-server-name"]:
        return options["override-server-name"]
    if target.kind != "tcp":
        raise usage.UsageError(
            f"--target {target} has no host name to check the server's "
            "certificate against; give --override-server-name"
        )
    return target.host


def _tls_version(options) -> str:
    text = options["max-tls-version"]
    version = _VERSIONS.get(text.upper().replace("V", ""))
    if version is None:
        raise usage.UsageError(
            f"--max-tls-version {text!r}: choose TLS1.2 or TLS1.3"
        )
    return version


def _alpn(options) -> tuple[str, ...]:
    text = options["alpn"]
    if text is None:
        return ()
    protocols = tuple(part.strip() for part in text.split(","))
    for protocol in protocols:
        if not protocol or len(protocol.encode()) > 255:
            raise usage.UsageError(
                f"--alpn {text!r}: each protocol is 1 to 255 bytes"
            )
        if protocol == "acme-tls/1":
            raise usage.UsageError("--alpn: acme-tls/1 is reserved for ACME")
    return protocols


def identity_fields(options, mode: str, target, workload_api: bool) -> dict:
    """
    Check the file, access and TLS flags and try the files and the policy
    once, so a mistake ends in one line before anything listens.

    @return: L{TunnelConfig} fields.
    """
    check_access_flags(options, mode, workload_api)
    fields: dict[str, object] = {
        "max_tls_version": _tls_version(options),
        "alpn": _alpn(options),
    }
    if workload_api:
        return fields

    rules = _rules(options, mode)
    files = _identity_files(options, mode)
    try:
        timed_reload = options._duration("timed-reload")
        load_identity(files)
    except FileIdentityError as error:
        raise usage.UsageError(str(error)) from None

    policy = None
    path, query = (options[name] for name in _MODES[mode]["policy"])
    if path:
        try:
            RegoPolicy(path, query)
        except PolicyError as error:
            raise usage.UsageError(str(error)) from None
        policy = (path, query)

    fields.update(
        files=files,
        timed_reload=timed_reload,
        names=rules,
        policy=policy,
        server_name=_server_name(options, mode, target, rules),
    )
    return fields
