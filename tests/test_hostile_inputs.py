"""
Hostile command-line values found by adversarial testing: each must be
refused while the flags are parsed (one line, exit 2), not accepted and
left to fail, or crash, once the process runs.

"""

from __future__ import annotations

import pytest
from twisted.python import usage

from ghosttwist.addresses import (
    InvalidAddress,
    parse_address,
    parse_workload_api_address,
)
from ghosttwist.devagent.options import DevAgentOptions
from ghosttwist.durations import InvalidDuration, parse_duration


@pytest.mark.parametrize("text", ["١٠s", "１０s", "5m１s"])
def test_duration_refuses_non_ascii_digits(text: str) -> None:
    """
    Go's notation uses ASCII digits only; other scripts' digits are refused.
    """
    with pytest.raises(InvalidDuration):
        parse_duration(text)


def test_address_refuses_non_ascii_port() -> None:
    """
    A port written in fullwidth digits is refused, not read as a number.
    """
    with pytest.raises(InvalidAddress):
        parse_address("127.0.0.1:８０", flag="--listen")


def test_workload_api_refuses_unix_path_too_long() -> None:
    """
    A unix socket path longer than Linux can bind is refused up front.
    """
    with pytest.raises(InvalidAddress):
        parse_workload_api_address("unix:///" + "c" * 200)


def test_workload_api_refuses_root_folder() -> None:
    """
    C{unix:///} names a folder, never a socket.
    """
    with pytest.raises(InvalidAddress):
        parse_workload_api_address("unix:///")


def _dev_agent(tmp_path, *flags: str) -> None:
    socket_path = tmp_path / "w.sock"
    DevAgentOptions().parseOptions(
        [
            "--trust-domain",
            "domain.test",
            "--workload",
            f"{socket_path}=spiffe://domain.test/w",
            *flags,
        ]
    )


def test_dev_agent_refuses_svid_ttl_out_of_range(tmp_path) -> None:
    """
    A TTL no certificate can carry is a flag error, not a traceback later.
    """
    with pytest.raises(usage.UsageError):
        _dev_agent(tmp_path, "--svid-ttl", "99999999999999h")


def test_dev_agent_refuses_ca_ttl_shorter_than_svid_ttl(tmp_path) -> None:
    """
    A CA that expires before the SVIDs it signs cannot serve anyone.
    """
    with pytest.raises(usage.UsageError):
        _dev_agent(tmp_path, "--ca-ttl", "1s", "--svid-ttl", "1h")
