"""
The address forms the flags take, as a table: what parses, and the one-line
reason for what does not.
"""

from __future__ import annotations

import pytest

from ghosttwist.addresses import (
    InvalidAddress,
    parse_address,
    parse_workload_api_address,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:8443", "127.0.0.1:8443"),
        ("[::1]:8443", "[::1]:8443"),
        ("localhost:80", "localhost:80"),
        ("backend_svc.local:80", "backend_svc.local:80"),
        ("unix:/run/app.sock", "unix:/run/app.sock"),
    ],
)
def test_good_addresses(text, expected):
    assert str(parse_address(text, flag="--listen")) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("8443", "HOST:PORT"),
        ("::1:80", "brackets"),
        ("unix:", "empty"),
        ("unix://127.0.0.1", "takes a path"),
        ("tcp://127.0.0.1:80", "without a scheme"),
        ("999.1.1.1:80", "neither an IP address nor a host name"),
        ("host name:80", "neither an IP address nor a host name"),
        (" 127.0.0.1:80", "neither an IP address nor a host name"),
        ("ünïcode.test:80", "neither an IP address nor a host name"),
        ("[fe80::1%lo]:80", "scoped IPv6"),
        ("127.0.0.1:99999", "1 to 65535"),
        ("127.0.0.1:0", "1 to 65535"),
        ("127.0.0.1:８０", "1 to 65535"),
        ("unix:/" + "a" * 200, "107 bytes"),
    ],
)
def test_bad_addresses_say_why(text, message):
    with pytest.raises(InvalidAddress, match=message) as raised:
        parse_address(text, flag="--listen")
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith("--listen ")


@pytest.mark.parametrize(
    "text, message",
    [
        ("unix://run/agent.sock", "unix:///run/agent.sock"),
        ("npipe:agent", "named pipes"),
        ("tcp://localhost:8081", "IP address"),
        ("/run/agent.sock", "unix:///run/agent.sock"),
        ("unix:///", "absolute/path"),
        ("http://127.0.0.1:1", "unix:///"),
    ],
)
def test_bad_workload_api_addresses_show_the_right_form(text, message):
    with pytest.raises(InvalidAddress, match=message):
        parse_workload_api_address(text)


def test_workload_api_address_forms():
    unix = parse_workload_api_address("unix:///run/spire/agent.sock")
    tcp = parse_workload_api_address("tcp://127.0.0.1:8081")

    assert (unix.kind, unix.grpc_target) == ("unix", "unix:/run/spire/agent.sock")
    assert (tcp.kind, tcp.grpc_target) == ("tcp", "ipv4:127.0.0.1:8081")
