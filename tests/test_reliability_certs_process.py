"""
Hostile certificates against a real server tunnel: every X509-SVID the
specification forbids is refused during the handshake, the reason is in the
tunnel's log and counted in /_metrics as refused.<reason>, and no byte of
such a peer reaches the target.

One dev agent (signing with a CA whose key the test holds, and federated
with a second trust domain whose key it also holds), one server tunnel and
one backend serve the whole module; each case is one client.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests import certs
from tests.processes import (
    Backend,
    DevAgent,
    Tunnel,
    echo,
    free_port,
    recv_all,
    wait_for,
    write_identity,
)
from tests.test_status_process import request

FRONTEND = "spiffe://domain.test/frontend"
_NOW = datetime.datetime.now(datetime.UTC)
_DAY = datetime.timedelta(days=1)
_VALID = {"not_before": _NOW - _DAY, "not_after": _NOW + 30 * _DAY}


def _ca(name: str, issuer=None, **kwargs) -> certs.Issued:
    kwargs = {**_VALID, **kwargs}
    if issuer is None:
        return certs.root_ca(name, **kwargs)
    return certs.intermediate_ca(issuer, name, **kwargs)


def _leaf(issuer, spiffe_id=FRONTEND, **kwargs) -> certs.Issued:
    return certs.leaf(issuer, spiffe_id, **{**_VALID, **kwargs})


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Setting:
    """
    The module's agent, tunnel and backend, and the CAs behind them.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root = _ca("domain.test root")
        self.federated = _ca("other.test root")
        (folder / "ca.pem").write_bytes(_pem(self.root.cert))
        (folder / "ca-key.pem").write_bytes(_key_pem(self.root.key))
        (folder / "other.pem").write_bytes(_pem(self.federated.cert))
        self.agent = DevAgent(
            folder,
            ("backend", "frontend"),
            "--ca",
            str(folder / "ca.pem"),
            "--ca-key",
            str(folder / "ca-key.pem"),
            "--federate-with",
            f"other.test={folder / 'other.pem'}",
        )
        self.backend = Backend(echo)
        self.status_port = free_port()
        self.tunnel = Tunnel(
            folder,
            "server",
            self.backend.address,
            "--use-workload-api-addr",
            self.agent.address("backend"),
            "--allow-uri",
            FRONTEND,
            "--status",
            f"http://127.0.0.1:{self.status_port}",
        )
        try:
            self.tunnel.wait_listening()
        except BaseException:
            self.stop()
            raise

    def metrics(self) -> dict[str, float]:
        _, _, body = request(self.status_port, "/_metrics")
        return {item["metric"]: item["value"] for item in json.loads(body)}

    def client(self, name: str, chain, key) -> ssl.SSLContext:
        paths = write_identity(self.folder, name, chain, key, [self.root.cert])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(str(paths["cert"]), str(paths["key"]))
        return context

    def stop(self) -> None:
        self.tunnel.stop()
        self.agent.stop()
        self.backend.close()


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    made = Setting(tmp_path_factory.mktemp("hostile-certs"))
    yield made
    made.stop()


def _exchange(port: int, context: ssl.SSLContext) -> bytes:
    """
    Handshake, send a probe and read the answer; what a refused client sees
    is an alert or the end of the connection, so an empty answer.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        with context.wrap_socket(raw) as connection:
            connection.sendall(b"probe")
            return recv_all(connection, 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        raw.close()


def _chain_of(*issued: certs.Issued) -> list[x509.Certificate]:
    return [item.cert for item in issued]


def _outside_bundle(s: Setting):
    rogue = _ca("rogue root")
    return _leaf(rogue), [rogue]


def _federated_signs_local(s: Setting):
    return _leaf(s.federated), []


def _expired(s: Setting):
    return _leaf(s.root, not_before=_NOW - 10 * _DAY, not_after=_NOW - _DAY), []


def _not_yet_valid(s: Setting):
    return _leaf(s.root, not_before=_NOW + _DAY, not_after=_NOW + 10 * _DAY), []


def _intermediate_not_ca(s: Setting):
    middle = _ca("not a CA", s.root, ca=False, key_cert_sign=True)
    return _leaf(middle), [middle]


def _intermediate_cannot_sign(s: Setting):
    middle = _ca("no keyCertSign", s.root, key_cert_sign=False)
    return _leaf(middle), [middle]


def _leaf_is_ca(s: Setting):
    return _leaf(s.root, ca=True, digital_signature=True), []


def _leaf_signs_certificates(s: Setting):
    return _leaf(s.root, key_cert_sign=True), []


def _leaf_without_key_usage(s: Setting):
    return _leaf(s.root, key_usage=False), []


def _two_uri_sans(s: Setting):
    return _leaf(s.root, uris=[FRONTEND, "spiffe://domain.test/other"]), []


def _uri(text: str):
    return lambda s: (_leaf(s.root, uris=[text]), [])


def _dns_only(s: Setting):
    return _leaf(s.root, uris=[], dns_names=["frontend.domain.test"]), []


def _chain_too_long(s: Setting):
    issuer, middles = s.root, []
    for number in range(9):
        issuer = _ca(f"intermediate {number}", issuer)
        middles.insert(0, issuer)
    return _leaf(issuer), middles


def _forged_signature(s: Setting):
    return _leaf(s.root, sign_with=certs.new_key()), []


def _unknown_trust_domain(s: Setting):
    return _leaf(s.root, "spiffe://elsewhere.test/frontend"), []


HOSTILE = {
    "ca-outside-the-bundle": (_outside_bundle, "untrusted-chain"),
    "federated-ca-signs-a-local-id": (_federated_signs_local, "untrusted-chain"),
    "forged-signature": (_forged_signature, "untrusted-chain"),
    "expired": (_expired, "expired"),
    "not-yet-valid": (_not_yet_valid, "not-yet-valid"),
    "intermediate-not-a-ca": (_intermediate_not_ca, "intermediate-not-ca"),
    "intermediate-without-keycertsign": (
        _intermediate_cannot_sign,
        "intermediate-not-ca",
    ),
    "leaf-is-a-ca": (_leaf_is_ca, "leaf-is-ca"),
    "leaf-may-sign-certificates": (_leaf_signs_certificates, "key-usage"),
    "leaf-without-key-usage": (_leaf_without_key_usage, "key-usage"),
    "two-uri-sans": (_two_uri_sans, "multiple-uri-sans"),
    "https-uri-san": (_uri("https://domain.test/frontend"), "no-spiffe-id"),
    "no-uri-san": (_dns_only, "no-spiffe-id"),
    "dot-dot-segment": (
        _uri("spiffe://domain.test/a/../frontend"),
        "invalid-spiffe-id",
    ),
    "dot-segment": (_uri("spiffe://domain.test/./frontend"), "invalid-spiffe-id"),
    "empty-segment": (_uri("spiffe://domain.test//frontend"), "invalid-spiffe-id"),
    "trailing-slash": (_uri("spiffe://domain.test/frontend/"), "invalid-spiffe-id"),
    "percent-encoding": (_uri("spiffe://domain.test/fr%6Fntend"), "invalid-spiffe-id"),
    "upper-case-scheme": (_uri("SPIFFE://domain.test/frontend"), "invalid-spiffe-id"),
    "upper-case-domain": (_uri("spiffe://DOMAIN.test/frontend"), "invalid-spiffe-id"),
    "port": (_uri("spiffe://domain.test:443/frontend"), "invalid-spiffe-id"),
    "user-info": (_uri("spiffe://me@domain.test/frontend"), "invalid-spiffe-id"),
    "query": (_uri("spiffe://domain.test/frontend?x=1"), "invalid-spiffe-id"),
    "fragment": (_uri("spiffe://domain.test/frontend#x"), "invalid-spiffe-id"),
    "trust-domain-only": (_uri("spiffe://domain.test"), "invalid-spiffe-id"),
    "unknown-trust-domain": (_unknown_trust_domain, "unknown-trust-domain"),
    "chain-too-long": (_chain_too_long, "chain-too-long"),
}


def _refused_as(setting: Setting, name: str, context, reason: str) -> None:
    counter = f"ghosttwist.refused.{reason}"
    before = setting.metrics().get(counter, 0)
    logged = setting.tunnel.log.count(f": {reason}: ")
    reached = setting.backend.accepted

    assert _exchange(setting.tunnel.port, context) == b"", f"{name} was served"

    wait_for(
        lambda: setting.metrics().get(counter, 0) == before + 1,
        f"{counter} to count {name}",
    )
    setting.tunnel.wait_for_log(f": {reason}: ", count=logged + 1)
    refusal = [
        line
        for line in setting.tunnel.log.splitlines()
        if "refused connection from" in line and f": {reason}: " in line
    ][-1]
    assert "Traceback" not in setting.tunnel.log
    assert setting.backend.accepted == reached, f"{name} reached the target"
    assert refusal


def test_a_valid_svid_from_the_bundle_ca_is_served(setting):
    """
    The control case: a well-formed SVID signed by the agent's CA goes
    through, so the refusals below are for the defect each case has.
    """
    issued = _leaf(setting.root)
    context = setting.client("valid", [issued.cert], issued.key)

    assert _exchange(setting.tunnel.port, context) == b"probe"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_certificate_is_refused_logged_and_counted(setting, name):
    make, reason = HOSTILE[name]
    issued, intermediates = make(setting)
    context = setting.client(
        name, [issued.cert, *_chain_of(*intermediates)], issued.key
    )

    _refused_as(setting, name, context, reason)


def test_client_without_certificate_is_refused(setting):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    _refused_as(setting, "no certificate", context, "no-certificate")


def _tlslite_exchange(port: int, cert: x509.Certificate, key) -> bytes:
    """
    Handshake with tlslite-ng over TLS 1.2 presenting C{cert} but signing
    with C{key}, send a probe and read the answer (empty when refused).

    tlslite-ng is used because OpenSSL, and so the ssl module and
    pyOpenSSL, refuse to load a certificate with a key that does not match
    it. Its TLS 1.3 client cannot complete a handshake with client
    certificates against OpenSSL ("unexpected message"), so TLS 1.2.
    """
    from tlslite.api import HandshakeSettings, TLSConnection, X509CertChain, parsePEMKey
    from tlslite.errors import TLSError

    chain = X509CertChain()
    chain.parsePemList(_pem(cert).decode())
    settings = HandshakeSettings()
    settings.maxVersion = (3, 3)
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        connection = TLSConnection(raw)
        connection.handshakeClientCert(
            chain, parsePEMKey(_key_pem(key).decode(), private=True), settings=settings
        )
        connection.write(b"probe")
        return bytes(connection.read(max=5))
    except (TLSError, OSError):
        return b""
    finally:
        raw.close()


def test_certificate_whose_key_does_not_match_is_refused(setting):
    """
    A client presenting a valid SVID but signing the handshake with another
    key is refused as a failed handshake (a bad signature) and counted;
    the same client with the right key is served.
    """
    issued = _leaf(setting.root)
    counter = "ghosttwist.refused.handshake-failed"
    before = setting.metrics().get(counter, 0)
    reached = setting.backend.accepted

    refused = _tlslite_exchange(setting.tunnel.port, issued.cert, certs.new_key())
    wait_for(lambda: setting.metrics().get(counter, 0) == before + 1, counter)
    log = setting.tunnel.wait_for_log(": handshake-failed: ")
    after_refusal = setting.backend.accepted
    served = _tlslite_exchange(setting.tunnel.port, issued.cert, issued.key)

    assert refused == b""
    assert after_refusal == reached
    assert any(
        "refused connection from" in line and "bad signature" in line
        for line in log.splitlines()
    )
    assert served == b"probe"


# The same certificates presented by a server to a client tunnel.


class HostileServer:
    """
    A TLS echo server on loopback presenting whichever certificate the test
    last gave it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.context: ssl.SSLContext | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def present(self, name: str, chain, key) -> None:
        paths = write_identity(self.folder, f"server-{name}", chain, key, [])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(paths["cert"]), str(paths["key"]))
        self.context = context

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            raw.settimeout(15)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.sendall(tls.recv(5))
            except (OSError, ssl.SSLError):
                raw.close()


@pytest.fixture(scope="module")
def client_tunnel(setting):
    server = HostileServer(setting.folder)
    status_port = free_port()
    tunnel = Tunnel(
        setting.folder,
        "client",
        f"127.0.0.1:{server.port}",
        "--use-workload-api-addr",
        setting.agent.address("frontend"),
        "--verify-uri",
        "spiffe://domain.test/backend",
        "--status",
        f"http://127.0.0.1:{status_port}",
    )
    tunnel.status_port = status_port
    try:
        tunnel.wait_listening()
        yield server, tunnel
    finally:
        tunnel.stop()
        server.listener.close()


def _through_client(tunnel: Tunnel) -> bytes:
    with socket.create_connection(("127.0.0.1", tunnel.port), timeout=15) as plain:
        plain.sendall(b"probe")
        try:
            return recv_all(plain, 5)
        except ConnectionError:
            return b""


def _client_metrics(tunnel: Tunnel) -> dict[str, float]:
    _, _, body = request(tunnel.status_port, "/_metrics")
    return {item["metric"]: item["value"] for item in json.loads(body)}


def test_client_tunnel_is_served_by_a_valid_server(setting, client_tunnel):
    server, tunnel = client_tunnel
    issued = _leaf(setting.root, "spiffe://domain.test/backend")
    server.present("valid", [issued.cert], issued.key)

    assert _through_client(tunnel) == b"probe"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_client_tunnel_refuses_a_hostile_server(setting, client_tunnel, name):
    server, tunnel = client_tunnel
    make, reason = HOSTILE[name]
    issued, intermediates = make(setting)
    server.present(name, [issued.cert, *_chain_of(*intermediates)], issued.key)
    counter = f"ghosttwist.refused.{reason}"
    before = _client_metrics(tunnel).get(counter, 0)
    logged = tunnel.log.count(f"refused server 127.0.0.1:{server.port}: {reason}: ")

    assert _through_client(tunnel) == b""

    wait_for(
        lambda: _client_metrics(tunnel).get(counter, 0) == before + 1,
        f"{counter} to count {name}",
    )
    tunnel.wait_for_log(
        f"refused server 127.0.0.1:{server.port}: {reason}: ", count=logged + 1
    )
    assert "Traceback" not in tunnel.log
