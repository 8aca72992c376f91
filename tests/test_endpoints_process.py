"""
The C{spiffe:} endpoint strings in real programs: the examples in
docs/examples serve and fetch a page over mutual TLS with dev-agent SVIDs.
"""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest
from twisted.internet.endpoints import serverFromString

from tests.processes import (
    REPOSITORY,
    Process,
    environment,
    free_port,
    port_answers,
    recv_all,
    svid_files,
    tls_client,
    tls_connect,
    wait_for,
)

EXAMPLES = REPOSITORY / "docs" / "examples"


@pytest.fixture
def site(agent, tmp_path, processes):
    port = free_port()
    description = (
        f"spiffe:tcp\\:{port}\\:interface\\=127.0.0.1"
        ":allow=spiffe\\://domain.test/frontend"
    )
    process = Process(
        [sys.executable, str(EXAMPLES / "spiffe_site.py"), description],
        tmp_path / "site.log",
        env=environment(SPIFFE_ENDPOINT_SOCKET=agent.address("backend")),
    )
    processes.append(process)
    wait_for(lambda: port_answers(port), "the example site")
    return port


def test_agent_fetches_the_page_through_endpoint_strings(agent, site):
    """
    Twisted's Agent, dialing through a spiffe: client endpoint with the
    frontend SVID, gets the page served through a spiffe: server endpoint.
    """
    description = f"spiffe:tcp\\:127.0.0.1\\:{site}:verify=spiffe\\://domain.test/backend"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "spiffe_get.py"), description],
        capture_output=True, text=True, timeout=60,
        env=environment(SPIFFE_ENDPOINT_SOCKET=agent.address("frontend")),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "200 hello over SPIFFE mTLS"


def test_client_with_the_wrong_id_or_no_certificate_is_refused(agent, site, tmp_path):
    """
    The page is not served to a client that proves another SPIFFE ID, nor
    to one that presents no certificate.
    """
    intruder = svid_files(agent, "intruder", tmp_path)

    for files in (intruder, None):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with tls_connect(site, tls_client(files, intruder["ca"])) as connection:
                connection.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert recv_all(connection) == b""


@pytest.mark.parametrize(
    "description, message",
    [
        ("spiffe:tcp\\:0", "allow="),
        ("spiffe:tcp\\:0:allow=spiffe\\://Bad/x", "SPIFFE"),
        ("spiffe:tcp\\:0:allow_all=yes:colour=blue", "colour"),
        ("spiffe:allow_all=yes", "one wrapped endpoint"),
        (
            "spiffe:tcp\\:0:allow_all=yes:allow=spiffe\\://domain.test/a",
            "exclude each other",
        ),
        ("spiffe:tcp\\:0:allow=", "empty"),
    ],
)
def test_bad_descriptions_are_refused_with_a_reason(description, message, monkeypatch):
    """
    A description that cannot work says why when it is parsed.
    """
    from twisted.internet import reactor

    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///nonexistent/agent.sock")

    with pytest.raises(ValueError, match=message):
        serverFromString(reactor, description)
