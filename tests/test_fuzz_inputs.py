"""
Property tests (hypothesis) of everything that parses user or peer input:
each function either returns a valid value or raises its documented error,
never anything else.
"""

from __future__ import annotations

import datetime
import ipaddress
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spiffe import SpiffeId
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python import usage

from ghosttwist import proxyproto
from ghosttwist.addresses import (
    Address,
    InvalidAddress,
    WorkloadApiAddress,
    parse_address,
    parse_workload_api_address,
)
from ghosttwist.auth.policy import InvalidPattern, SpiffeIdPattern
from ghosttwist.auth.rego import input_document
from ghosttwist.durations import InvalidDuration, format_duration, parse_duration
from ghosttwist.options import ClientOptions, ServerOptions
from ghosttwist.spiffeid import InvalidSpiffeId, parse_spiffe_id

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

_TRICKY = [
    "",
    " ",
    "\x00",
    "/",
    "//",
    ":",
    "::",
    "[",
    "]",
    "[::1",
    "unix:",
    "unix://",
    "systemd:",
    "127.0.0.1:",
    ":0",
    "0",
    "-1",
    "1e9",
    "1h",
    "0s",
    "spiffe://",
    "spiffe://x",
    "spiffe://x/y",
    "http://[::1",
    "https://127.0.0.1:99999/",
    "é",
    "١٠s",
    "a" * 300,
    "/nonexistent/file.pem",
    "%00",
    "..",
    "*",
    "**",
]
_VALUES = st.one_of(st.text(max_size=40), st.sampled_from(_TRICKY))


def _flags(options_class) -> list[str]:
    names = []
    for name in set(options_class().longOpt):
        if name.rstrip("=") not in ("help", "version"):
            names.append(name)
    return sorted(names)


def _argv(options_class):
    flag = st.sampled_from(_flags(options_class))

    def arguments(name: str, value: str) -> list[str]:
        if name.endswith("="):
            return [f"--{name[:-1]}", value]
        return [f"--{name}"]

    pair = st.builds(arguments, flag, _VALUES)
    base = st.sampled_from(
        [
            [],
            [
                "--listen",
                "127.0.0.1:1",
                "--target",
                "127.0.0.1:2",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--allow-all",
            ],
        ]
    )
    return st.builds(
        lambda start, pairs: start + [part for each in pairs for part in each],
        base,
        st.lists(pair, max_size=6),
    )


@FUZZ
@given(_argv(ServerOptions))
def test_server_options_raise_only_usage_errors(argv):
    try:
        ServerOptions().parseOptions(argv)
    except usage.UsageError as error:
        assert "\n" not in str(error).strip()


@FUZZ
@given(_argv(ClientOptions))
def test_client_options_raise_only_usage_errors(argv):
    try:
        ClientOptions().parseOptions(argv)
    except usage.UsageError as error:
        assert "\n" not in str(error).strip()


@FUZZ
@given(st.lists(_VALUES, max_size=8))
def test_any_argv_raises_only_usage_errors(argv):
    try:
        ServerOptions().parseOptions(argv)
    except usage.UsageError:
        pass


@FUZZ
@given(_VALUES, st.booleans())
def test_addresses(text, allow_port_zero):
    try:
        address = parse_address(text, flag="--listen", allow_port_zero=allow_port_zero)
    except InvalidAddress as error:
        assert "--listen" in str(error) and "\n" not in str(error)
        return
    assert isinstance(address, Address)


@FUZZ
@given(
    st.from_regex(r"\A(\[[0-9a-f:]{0,12}\]|[0-9.]{0,15}|[a-z.-]{0,12}):[0-9]{0,6}\Z")
)
def test_host_port_shapes(text):
    try:
        address = parse_address(text, flag="--target")
    except InvalidAddress:
        return
    assert 1 <= address.port <= 65535


@FUZZ
@given(_VALUES)
def test_workload_api_addresses(text):
    try:
        address = parse_workload_api_address(text)
    except InvalidAddress:
        return
    assert isinstance(address, WorkloadApiAddress)


@FUZZ
@given(
    st.one_of(
        _VALUES,
        st.from_regex(r"\A([0-9]{0,4}(\.[0-9]{0,3})?(ns|us|µs|ms|s|m|h)?){0,3}\Z"),
    )
)
def test_durations(text):
    try:
        seconds = parse_duration(text)
    except InvalidDuration as error:
        assert "\n" not in str(error)
        return
    assert isinstance(seconds, float) and seconds >= 0


@FUZZ
@given(st.integers(min_value=0, max_value=10**7))
def test_formatted_durations_parse_back(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


_ID_TEXT = st.one_of(
    _VALUES,
    st.builds(
        lambda scheme, domain, path: f"{scheme}://{domain}{path}",
        st.sampled_from(["spiffe", "SPIFFE", "Spiffe", "http"]),
        st.from_regex(r"\A[a-zA-Z0-9.\-_%@:]{0,12}\Z"),
        st.from_regex(r"\A(/[a-zA-Z0-9.\-_%*?#]{0,6}){0,4}/?\Z"),
    ),
)


@FUZZ
@given(_ID_TEXT)
def test_spiffe_ids(text):
    try:
        spiffe_id = parse_spiffe_id(text)
    except InvalidSpiffeId as error:
        assert "\n" not in str(error)
        return
    assert isinstance(spiffe_id, SpiffeId)
    assert str(spiffe_id) == text
    assert parse_spiffe_id(str(spiffe_id)) == spiffe_id


@FUZZ
@given(_ID_TEXT, _ID_TEXT)
def test_wildcard_patterns(pattern_text, id_text):
    try:
        pattern = SpiffeIdPattern.parse(pattern_text)
    except InvalidPattern as error:
        assert "\n" not in str(error)
        return
    assert isinstance(pattern.matches(id_text), bool)
    assert SpiffeIdPattern.parse(str(pattern)) == pattern


_IPV4 = st.ip_addresses(v=4).map(str)
_IPV6 = st.ip_addresses(v=6).map(str)
_PORT = st.integers(min_value=0, max_value=65535)
_ADDRESS = st.one_of(
    st.builds(lambda host, port: IPv4Address("TCP", host, port), _IPV4, _PORT),
    st.builds(lambda host, port: IPv6Address("TCP", host, port), _IPV6, _PORT),
)
_ID_TLV = st.one_of(st.none(), st.text(max_size=300))


def _as_v6(host: str) -> ipaddress.IPv6Address:
    address = ipaddress.ip_address(host)
    if address.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{address}")
    return address


@FUZZ
@given(_ADDRESS, _ADDRESS, _ID_TLV, st.sampled_from(["conn", "tls"]))
def test_proxy_headers_round_trip_through_twisted(source, destination, spiffe_id, mode):
    header = proxyproto.header(mode, source, destination, spiffe_id=spiffe_id)

    info, rest = V2Parser().feed(header + b"after")

    assert rest == b"after"
    family = header[13]
    length = int.from_bytes(header[14:16], "big")
    block = 12 if family == proxyproto.PP2_FAMILY_TCP4 else 36
    records = proxyproto.parse_tlvs(header[16 + block : 16 + length])
    assert info.source.port == source.port
    assert info.destination.port == destination.port
    if family == proxyproto.PP2_FAMILY_TCP4:
        assert (info.source.host, info.destination.host) == (
            source.host,
            destination.host,
        )
    else:
        assert ipaddress.ip_address(info.source.host) == _as_v6(source.host)
        assert ipaddress.ip_address(info.destination.host) == _as_v6(destination.host)
    ids = [value for kind, value in records if kind == proxyproto.PP2_TYPE_SPIFFE_ID]
    assert ids == ([spiffe_id.encode()] if spiffe_id else [])


@FUZZ
@given(st.binary(max_size=200))
def test_tlv_parsing_of_any_bytes(data):
    try:
        records = proxyproto.parse_tlvs(data)
    except ValueError:
        return
    assert sum(3 + len(value) for _, value in records) == len(data)


_KEY = ec.generate_private_key(ec.SECP256R1())
_ASCII = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
)


def _certificate(common_name: str, uris: list[str], dns: list[str]) -> x509.Certificate:
    now = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
        .public_key(_KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    names = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(_KEY, hashes.SHA256())


@FUZZ
@given(
    st.text(min_size=1, max_size=16),
    st.lists(st.one_of(_ASCII, st.sampled_from(_TRICKY[:26])), max_size=3),
    st.lists(_ASCII.filter(bool), max_size=2),
)
def test_rego_input_for_any_peer_certificate(common_name, uris, dns):
    uris = [uri for uri in uris if uri.isascii()]
    certificate = _certificate(common_name, uris, dns)

    document = input_document([certificate])

    assert json.loads(json.dumps(document)) == document
    assert document["certificate"]["Subject"]["CommonName"] == common_name
    assert [uri["Raw"] for uri in document["certificate"]["URIs"]] == uris
