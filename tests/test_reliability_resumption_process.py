"""
TLS session resumption against real tunnels.

Tunnels issue session tickets, so a peer that comes back resumes instead of
making a full handshake; the certificate the session was made with is then
judged again, against the policy and the clock of now. Every identity,
bundle or policy change builds a new context, whose tickets are its own:
a peer that such a change has made unacceptable (its ID taken off a Rego
policy, its CA out of the bundle) cannot get in by offering a session from
before, and neither can a peer whose certificate has since expired.

The client is pyOpenSSL, which can offer a saved session; a control against
an ssl-module server that does resume shows that the client notices.
"""

from __future__ import annotations

import datetime
import signal
import socket
import ssl
import struct
import threading
from pathlib import Path

import pytest
from OpenSSL import SSL

from tests.pki import Pki, key_pem, pem
from tests.processes import free_port, svid_files, wait_for
from tests.test_status_events_process import _metric_reaches
from tests.test_status_process import start_server

_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

# X.509 validity has whole seconds; past this, "now" is surely after it.
_CLOCK_SLACK = datetime.timedelta(seconds=1)


def _session_reused(connection: SSL.Connection) -> bool:
    """
    OpenSSL's SSL_session_reused: pyOpenSSL does not wrap it, so it is read
    through pyOpenSSL's own cffi binding.
    """
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(connection._ssl))


class _Client:
    """
    A pyOpenSSL client that keeps the session of its latest connection and
    offers it on the next.
    """

    def __init__(self, cert: Path, key: Path, version: str) -> None:
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.context.set_min_proto_version(_VERSIONS[version])
        self.context.set_max_proto_version(_VERSIONS[version])
        self.context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        self.context.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
        self.context.use_certificate_chain_file(str(cert))
        self.context.use_privatekey_file(str(key))
        self.session = None

    def exchange(self, port: int) -> tuple[bytes, bool]:
        """
        Connect (offering the saved session, if any), send a probe, read its
        echo; return what came back and whether the session was resumed.
        """
        raw = socket.create_connection(("127.0.0.1", port), timeout=15)
        # pyOpenSSL wants a blocking socket; the kernel bounds each wait.
        raw.settimeout(None)
        limit = struct.pack("ll", 15, 0)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        connection = SSL.Connection(self.context, raw)
        connection.set_connect_state()
        if self.session is not None:
            connection.set_session(self.session)
        answer = b""
        try:
            connection.do_handshake()
            connection.sendall(b"probe")
            answer = connection.recv(5)
            self.session = connection.get_session()
            # A session is kept for resumption only after a clean close.
            connection.shutdown()
        except (SSL.Error, OSError):
            pass
        reused = _session_reused(connection)
        raw.close()
        return answer, reused


def _identity_files(folder: Path, pki: Pki, name: str, **kwargs) -> tuple[Path, Path]:
    issued = pki.issue(name, **kwargs)
    return pki.split(issued, name)


def _resuming_server(folder: Path) -> tuple[int, Pki, threading.Event]:
    """
    An ssl-module echo server that issues session tickets, as a control.
    """
    pki = Pki(folder, "control")
    issued = pki.issue("localhost")
    (folder / "control-server.pem").write_bytes(
        pem(issued.cert, pki.intermediate.cert) + key_pem(issued.key)
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(folder / "control-server.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(tls.recv(5))
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    stop.listener = listener
    return listener.getsockname()[1], pki, stop


@pytest.mark.parametrize("version", sorted(_VERSIONS))
def test_the_client_resumes_where_a_server_allows_it(tmp_path, version):
    """
    The control: against a server with tickets on, the second connection
    resumes, so a False below is the tunnel's doing.
    """
    port, pki, stop = _resuming_server(tmp_path)
    client = _Client(*_identity_files(tmp_path, pki, "control-client"), version)
    try:
        first = client.exchange(port)
        second = client.exchange(port)
    finally:
        stop.set()
        stop.listener.close()

    assert first == (b"probe", False)
    assert second == (b"probe", True)


@pytest.mark.parametrize("version", sorted(_VERSIONS))
def test_tunnel_resumes_a_session_and_judges_it_again(
    tmp_path, agent, backend, start_tunnel, version
):
    status = free_port()
    server = start_server(
        start_tunnel, agent, backend.address, "--status", f"http://127.0.0.1:{status}"
    )
    files = svid_files(agent, "frontend", tmp_path)
    client = _Client(files["cert"], files["key"], version)

    first = client.exchange(server.port)
    second = client.exchange(server.port)

    assert first == (b"probe", False)
    assert second == (b"probe", True)
    line = server.wait_for_log("session resumed")
    assert "client spiffe://domain.test/frontend allowed by" in line
    values = _metric_reaches(status, "ghosttwist.conn.resumed", 1)
    assert values["ghosttwist.accept.success"] == 2


def test_client_tunnel_resumes_its_sessions_with_the_server_tunnel(pair):
    """
    Through a pair, later connections resume the session the client tunnel
    kept from an earlier one, and carry bytes as the first did.
    """
    server, client = pair

    for attempt in range(3):
        with socket.create_connection(("127.0.0.1", client.port), timeout=15) as raw:
            raw.sendall(b"ping %d" % attempt)
            assert raw.recv(64) == b"ping %d" % attempt

    line = server.wait_for_log("session resumed")
    assert "client spiffe://domain.test/frontend allowed by" in line


def test_session_of_an_expired_certificate_does_not_get_in(
    tmp_path, backend, start_tunnel
):
    """
    A client connects with a certificate about to expire and keeps the
    session; once the certificate has expired, offering that session (whose
    ticket is still good) gets it refused, not in.
    """
    pki = Pki(tmp_path)
    ends = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=4)
    server = _files_server(
        start_tunnel, backend, pki, tmp_path, "--allow-cn", "short-lived"
    )
    cert, key = pki.split(pki.issue("short-lived", not_after=ends), "short-lived")
    client = _Client(cert, key, "TLSv1.3")
    assert client.exchange(server.port) == (b"probe", False)
    reached = backend.accepted

    wait_for(
        lambda: datetime.datetime.now(datetime.UTC) > ends + _CLOCK_SLACK,
        "the client's certificate to expire",
    )
    answer, _ = client.exchange(server.port)

    assert answer == b""
    assert backend.accepted == reached
    line = server.wait_for_log("refused connection from")
    assert "expired: resumed session" in line


def _files_server(start_tunnel, backend, pki: Pki, folder: Path, *flags: str):
    issued = pki.issue("server", dns=["localhost"])
    return start_tunnel(
        "server",
        backend.address,
        "--keystore",
        str(pki.keystore(issued, "server")),
        "--cacert",
        str(pki.cacert),
        *flags,
    )


@pytest.mark.parametrize("version", sorted(_VERSIONS))
def test_session_from_before_a_policy_change_does_not_get_in(
    tmp_path, backend, start_tunnel, version
):
    """
    A client allowed by the Rego policy connects; the policy is reloaded
    without it; offering its saved session, it is refused. (A context with
    a Rego policy issues no tickets at all: a policy may look at the whole
    chain, which a session does not keep.)
    """
    pki = Pki(tmp_path)
    policy = tmp_path / "policy.rego"
    policy.write_text(
        'package tunnel\nallow if input.certificate.Subject.CommonName == "client1"\n'
    )
    server = _files_server(
        start_tunnel,
        backend,
        pki,
        tmp_path,
        "--allow-policy",
        str(policy),
        "--allow-query",
        "data.tunnel.allow",
    )
    client = _Client(*_identity_files(tmp_path, pki, "client1"), version)
    assert client.exchange(server.port) == (b"probe", False)
    reached = backend.accepted

    policy.write_text(
        'package tunnel\nallow if input.certificate.Subject.CommonName == "other"\n'
    )
    server.signal(signal.SIGHUP)
    server.wait_for_log("reload (SIGHUP)")
    _, reused = wait_for(
        lambda: (result := client.exchange(server.port))[0] == b"" and result,
        "client1 refused under the new policy",
    )

    assert reused is False
    assert backend.accepted == reached
    assert "unauthorized" in server.wait_for_log("refused connection from")


@pytest.mark.parametrize("version", sorted(_VERSIONS))
def test_session_from_before_a_bundle_change_does_not_get_in(
    tmp_path, backend, start_tunnel, version
):
    """
    A client whose CA is in the bundle connects; the bundle is reloaded
    without that CA; offering its saved session, it is refused.
    """
    pki, other = Pki(tmp_path), Pki(tmp_path, "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pem(pki.root.cert, other.root.cert))
    issued = pki.issue("server", dns=["localhost"])
    server = start_tunnel(
        "server",
        backend.address,
        "--keystore",
        str(pki.keystore(issued, "server")),
        "--cacert",
        str(bundle),
        "--allow-all",
    )
    client = _Client(*_identity_files(tmp_path, other, "leaving"), version)
    assert client.exchange(server.port) == (b"probe", False)
    reached = backend.accepted

    bundle.write_bytes(pem(pki.root.cert))
    server.signal(signal.SIGHUP)
    server.wait_for_log("reload (SIGHUP)")
    _, reused = wait_for(
        lambda: (result := client.exchange(server.port))[0] == b"" and result,
        "the client refused once its CA left the bundle",
    )

    assert reused is False
    assert backend.accepted == reached


def test_peer_with_an_unparsable_uri_san_is_judged_by_the_policy(
    tmp_path, backend, start_tunnel
):
    """
    A URI SAN that no URL parser accepts ("x://[") does not break building
    the Rego input: the policy still decides, here by the common name.
    """
    pki = Pki(tmp_path)
    policy = tmp_path / "policy.rego"
    policy.write_text(
        'package tunnel\nallow if input.certificate.Subject.CommonName == "client1"\n'
    )
    server = _files_server(
        start_tunnel,
        backend,
        pki,
        tmp_path,
        "--allow-policy",
        str(policy),
        "--allow-query",
        "data.tunnel.allow",
    )
    allowed = _Client(
        *_identity_files(tmp_path, pki, "client1", uris=["x://["]), "TLSv1.3"
    )
    denied = _Client(
        *_identity_files(tmp_path, pki, "client2", uris=["x://["]), "TLSv1.3"
    )

    assert allowed.exchange(server.port)[0] == b"probe"
    assert denied.exchange(server.port)[0] == b""
    assert "unauthorized" in server.wait_for_log("refused connection from")
    assert "Traceback" not in server.log
