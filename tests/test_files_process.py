"""
Integration tests for identities from files: real C{twistd -n ghosttwist}
processes reading certificates written by the test, real TLS clients on
loopback, real signals.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from ghosttwist.auth.certnames import spki_pin
from tests.pki import Pki, key_pem, mint, pem
from tests.processes import (
    Process,
    environment,
    free_port,
    peer_serial,
    recv_all,
    tls_connect,
    twistd,
    wait_for,
)


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


def _serial(issued) -> str:
    return format(issued.cert.serial_number, "x")


def _client_context(folder: Path, pki: Pki | None, issued=None, name="peer"):
    """
    An ssl client trusting C{pki}'s root (or nothing, with no check), that
    presents C{issued} if given.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if pki is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(pki.cacert))
    if issued is not None:
        chain = folder / f"{name}-chain.pem"
        key = folder / f"{name}-key.pem"
        extra = (pki.intermediate.cert,) if pki else ()
        chain.write_bytes(pem(issued.cert, *extra))
        key.write_bytes(key_pem(issued.key))
        context.load_cert_chain(str(chain), str(key))
    return context


def _echo_through(port: int, context: ssl.SSLContext) -> tuple[bytes, str]:
    with tls_connect(port, context) as connection:
        connection.sendall(b"ping")
        return recv_all(connection, 4), peer_serial(connection)


def _refused(port: int, context: ssl.SSLContext) -> bool:
    """
    Whether the server ends the connection with an alert (or a close)
    instead of echoing: TLS 1.3 clients learn of it on their first read.
    """
    try:
        with tls_connect(port, context) as connection:
            connection.sendall(b"ping")
            return recv_all(connection, 4) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def _server_identity(pki: Pki, tmp_path: Path, **kwargs):
    issued = pki.issue("server", dns=["localhost"], ips=["127.0.0.1"], **kwargs)
    return issued, pki.keystore(issued, "server")


def _server(start_tunnel, backend, pki, keystore, *flags, name=None):
    return start_tunnel(
        "server",
        backend.address,
        "--keystore",
        str(keystore),
        "--cacert",
        str(pki.cacert),
        *flags,
        name=name,
    )


# Formats.


def _odd_pem(pki, issued):
    return ["--keystore", str(pki.keystore(issued, "odd", order="odd"))]


def _split(pki, issued):
    cert, key = pki.split(issued, "split")
    return ["--cert", str(cert), "--key", str(key)]


def _p12(pki, issued):
    return ["--keystore", str(pki.pkcs12(issued, "plain", None))]


def _p12_password(pki, issued):
    path = pki.pkcs12(issued, "locked", b"s3cret")
    return ["--keystore", str(path), "--storepass", "s3cret"]


def _encrypted_key(pki, issued):
    cert, key = pki.split(issued, "enc")
    key.write_bytes(key_pem(issued.key, b"s3cret"))
    return ["--cert", str(cert), "--key", str(key), "--storepass", "s3cret"]


@pytest.mark.parametrize(
    "key_type, layout",
    [
        ("ec", _odd_pem),
        ("rsa", _split),
        ("ec", _split),
        ("ed25519", _split),
        ("ed25519", _odd_pem),
        ("ec", _p12),
        ("rsa", _p12_password),
        ("ec", _encrypted_key),
    ],
    ids=[
        "pem-odd-order", "split-rsa", "split-ecdsa", "split-ed25519",
        "pem-ed25519", "pkcs12", "pkcs12-password", "encrypted-pem-key",
    ],
)
def test_each_format_serves_leaf_then_intermediate(
    tmp_path, pki, backend, start_tunnel, key_type, layout
):
    """
    Whatever the file layout and key type, the server presents its leaf and
    then the intermediate, so a client that trusts only the root verifies it.
    """
    issued = pki.issue("server", key_type=key_type, ips=["127.0.0.1"])
    flags = layout(pki, issued)
    server = start_tunnel(
        "server", backend.address, *flags, "--cacert", str(pki.cacert),
        "--allow-cn", "client1",
    )
    context = _client_context(tmp_path, pki, pki.issue("client1"))

    echoed, serial = _echo_through(server.port, context)

    assert echoed == b"ping"
    assert serial == _serial(issued)


def test_environment_variables_stand_in_for_flags(tmp_path, pki, backend, processes):
    """
    KEYSTORE_PATH, KEYSTORE_PASS and CACERT_PATH work as ghostunnel's do.
    """
    issued = pki.issue("server", ips=["127.0.0.1"])
    env = environment(
        KEYSTORE_PATH=str(pki.pkcs12(issued, "env", b"pw")),
        KEYSTORE_PASS="pw",
        CACERT_PATH=str(pki.cacert),
    )
    port = free_port()
    arguments = twistd(
        "server", "--listen", f"127.0.0.1:{port}", "--target", backend.address,
        "--allow-cn", "client1",
    )
    tunnel = Process(arguments, tmp_path / "env.log", env=env)
    processes.append(tunnel)
    tunnel.wait_for_log("listening on")

    context = _client_context(tmp_path, pki, pki.issue("client1"))
    assert _echo_through(port, context) == (b"ping", _serial(issued))


# Reloads.


@pytest.mark.parametrize("how", ["SIGUSR1", "SIGHUP", "timer"])
def test_reload_swaps_certificate_and_keeps_open_connection(
    tmp_path, pki, backend, start_tunnel, how
):
    """
    After a reload new connections get the new certificate; a connection
    opened before it carries on.
    """
    first, keystore = _server_identity(pki, tmp_path)
    flags = ["--allow-cn", "client1"]
    if how == "timer":
        flags += ["--timed-reload", "1s"]
    server = _server(start_tunnel, backend, pki, keystore, *flags)
    context = _client_context(tmp_path, pki, pki.issue("client1"))

    opened = tls_connect(server.port, context)
    opened.sendall(b"one")
    assert recv_all(opened, 3) == b"one"
    assert peer_serial(opened) == _serial(first)

    second = pki.issue("server", ips=["127.0.0.1"])
    staged = tmp_path / "staged.pem"
    staged.write_bytes(pem(second.cert, pki.intermediate.cert) + key_pem(second.key))
    staged.replace(keystore)
    if how != "timer":
        server.signal(getattr(signal, how))

    wait_for(
        lambda: _echo_through(server.port, context)[1] == _serial(second),
        f"new serial after {how}",
    )
    opened.sendall(b"two")
    assert recv_all(opened, 3) == b"two"
    opened.close()


@pytest.mark.parametrize(
    "damage",
    ["missing", "half-written", "mismatched-key"],
)
def test_broken_file_on_reload_keeps_previous_identity(
    tmp_path, pki, backend, start_tunnel, damage
):
    """
    A reload that finds the files unusable logs why and keeps serving the
    certificate it had.
    """
    first, keystore = _server_identity(pki, tmp_path)
    server = _server(start_tunnel, backend, pki, keystore, "--allow-cn", "client1")
    context = _client_context(tmp_path, pki, pki.issue("client1"))

    if damage == "missing":
        keystore.unlink()
    elif damage == "half-written":
        keystore.write_bytes(keystore.read_bytes()[:300])
    else:
        other = pki.issue("server")
        keystore.write_bytes(pem(other.cert) + key_pem(first.key))
    server.signal(signal.SIGUSR1)

    log = server.wait_for_log("failed, keeping the previous identity")
    assert str(keystore) in log.split("failed, keeping the previous identity")[-1]
    assert _echo_through(server.port, context) == (b"ping", _serial(first))


# Access flags, server side.


CLIENTS = {
    "client1": dict(ou="team-a", dns=["client1.test"], ips=["127.0.0.7"],
                    uris=["spiffe://example.test/ns/a/client1",
                          "https://client1.test/id"]),
    "client2": dict(ou="team-b", dns=["client2.test"], ips=["127.0.0.8"],
                    uris=["spiffe://example.test/ns/b/client2",
                          "https://client2.test/id"]),
}


@pytest.mark.parametrize(
    "flags",
    [
        ["--allow-cn", "client1"],
        ["--allow-ou", "team-a"],
        ["--allow-dns", "client1.test"],
        ["--allow-ip", "127.0.0.7"],
        ["--allow-uri", "https://client1.test/id"],
        ["--allow-uri", "spiffe://example.test/ns/a/*"],
        ["--allow-cn", "nobody", "--allow-dns", "client1.test"],
    ],
    ids=["cn", "ou", "dns", "ip", "uri-exact", "uri-spiffe-wildcard", "or"],
)
def test_access_flag_allows_right_client_and_refuses_wrong(
    tmp_path, pki, backend, start_tunnel, flags
):
    """
    Each access flag lets in the client with the name and refuses, during
    the handshake, the client without it; the refused one never reaches
    the target.
    """
    _, keystore = _server_identity(pki, tmp_path)
    server = _server(start_tunnel, backend, pki, keystore, *flags)
    right = _client_context(tmp_path, pki, pki.issue("client1", **CLIENTS["client1"]))
    wrong = _client_context(
        tmp_path, pki, pki.issue("client2", **CLIENTS["client2"]), name="wrong"
    )

    assert _echo_through(server.port, right)[0] == b"ping"
    accepted = backend.accepted
    assert _refused(server.port, wrong)

    server.wait_for_log("refused connection from")
    assert "unauthorized" in server.log
    assert backend.accepted == accepted


def test_allow_all_takes_any_client_of_the_ca_only(
    tmp_path, pki, backend, start_tunnel
):
    """
    --allow-all lets in every client whose chain verifies against --cacert,
    and no client of another CA.
    """
    _, keystore = _server_identity(pki, tmp_path)
    server = _server(start_tunnel, backend, pki, keystore, "--allow-all")
    stranger_pki = Pki(tmp_path, "stranger")
    stranger = stranger_pki.issue("client1")
    foreign = _client_context(tmp_path, stranger_pki, stranger, name="foreign")
    foreign.load_verify_locations(cafile=str(pki.cacert))

    assert _echo_through(server.port, _client_context(tmp_path, pki, pki.issue("x")))
    assert _refused(server.port, foreign)
    server.wait_for_log("untrusted-chain")


def test_disable_authentication_asks_no_certificate(
    tmp_path, pki, backend, start_tunnel
):
    _, keystore = _server_identity(pki, tmp_path)
    server = _server(start_tunnel, backend, pki, keystore, "--disable-authentication")

    assert _echo_through(server.port, _client_context(tmp_path, pki))[0] == b"ping"


def test_allow_spki_pin_alone_authenticates_a_self_signed_client(
    tmp_path, pki, backend, start_tunnel
):
    """
    A pinned key is let in though its certificate is self-signed and chains
    to no CA; another self-signed key, and a CA-issued one, are refused.
    """
    _, keystore = _server_identity(pki, tmp_path)
    pinned = mint("pinned")
    server = _server(
        start_tunnel, backend, pki, keystore,
        "--allow-spki-pin", spki_pin(pinned.cert, "sha384"),
    )

    def context(issued, name):
        ctx = _client_context(tmp_path, None, issued, name=name)
        return ctx

    assert _echo_through(server.port, context(pinned, "pinned"))[0] == b"ping"
    assert _refused(server.port, context(mint("other"), "other"))
    assert _refused(
        server.port, _client_context(tmp_path, pki, pki.issue("client1"), name="ca")
    )


# Client mode.


@pytest.fixture
def file_server(tmp_path, pki, backend, start_tunnel):
    """
    A server tunnel whose certificate is valid for localhost and 127.0.0.1.
    """
    issued, keystore = _server_identity(pki, tmp_path)
    server = _server(start_tunnel, backend, pki, keystore, "--allow-cn", "client1",
                     name="file-server")
    server.issued = issued
    return server


def _client_tunnel(start_tunnel, pki, tmp_path, target, *flags, name="client"):
    client = pki.issue("client1")
    cert, key = pki.split(client, "client1")
    return start_tunnel(
        "client", target, "--cert", str(cert), "--key", str(key),
        "--cacert", str(pki.cacert), *flags, name=name,
    )


def _plain_echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"ping")
        return recv_all(connection, 4)


def test_client_checks_server_name_like_a_browser(
    tmp_path, pki, file_server, start_tunnel
):
    """
    The server's certificate is valid for 127.0.0.1 and localhost: dialing
    127.0.0.1 passes; a name it lacks (--override-server-name) is refused.
    """
    good = _client_tunnel(start_tunnel, pki, tmp_path, file_server.address)
    by_name = _client_tunnel(
        start_tunnel, pki, tmp_path, file_server.address,
        "--override-server-name", "localhost", name="by-name",
    )
    wrong = _client_tunnel(
        start_tunnel, pki, tmp_path, file_server.address,
        "--override-server-name", "elsewhere.test", name="wrong",
    )

    assert _plain_echo(good.port) == b"ping"
    assert _plain_echo(by_name.port) == b"ping"
    assert _plain_echo(wrong.port) == b""
    wrong.wait_for_log("hostname-mismatch")


@pytest.mark.parametrize(
    "flags, allowed",
    [
        (["--verify-cn", "server"], True),
        (["--verify-cn", "other"], False),
        (["--verify-dns", "localhost"], True),
        (["--verify-ip", "127.0.0.9"], False),
    ],
    ids=["cn-right", "cn-wrong", "dns-right", "ip-wrong"],
)
def test_client_verify_flags(tmp_path, pki, file_server, start_tunnel, flags, allowed):
    client = _client_tunnel(start_tunnel, pki, tmp_path, file_server.address, *flags)

    assert _plain_echo(client.port) == (b"ping" if allowed else b"")
    if not allowed:
        client.wait_for_log("refused server")


def test_client_verify_spki_pin_replaces_chain_and_name_checks(
    tmp_path, backend, start_tunnel
):
    """
    A server with a self-signed certificate for no name is accepted by its
    pin alone; a wrong pin refuses it.
    """
    pki = Pki(tmp_path)
    lone = mint("lone")
    keystore = tmp_path / "lone.pem"
    keystore.write_bytes(pem(lone.cert) + key_pem(lone.key))
    server = start_tunnel(
        "server", backend.address, "--keystore", str(keystore), "--cacert",
        str(pki.cacert), "--allow-cn", "client1",
    )
    pinned = _client_tunnel(
        start_tunnel, pki, tmp_path, server.address,
        "--verify-spki-pin", spki_pin(lone.cert),
    )
    wrong = _client_tunnel(
        start_tunnel, pki, tmp_path, server.address,
        "--verify-spki-pin", spki_pin(mint("x").cert), name="wrong",
    )

    assert _plain_echo(pinned.port) == b"ping"
    assert _plain_echo(wrong.port) == b""


# Rego.

POLICY = """
package tunnel

allow if input.certificate.Subject.CommonName == "client1"

allow if {
    some uri in input.certificate.URIs
    uri.Scheme == "spiffe"
    startswith(uri.Path, "/ns/b/")
}
"""


def test_rego_policy_allows_and_denies(tmp_path, pki, backend, start_tunnel):
    policy = tmp_path / "policy.rego"
    policy.write_text(POLICY)
    _, keystore = _server_identity(pki, tmp_path)
    server = _server(
        start_tunnel, backend, pki, keystore,
        "--allow-policy", str(policy), "--allow-query", "data.tunnel.allow",
    )
    by_cn = _client_context(tmp_path, pki, pki.issue("client1"), name="a")
    by_uri = _client_context(
        tmp_path, pki, pki.issue("x", uris=["spiffe://example.test/ns/b/x"]), name="b"
    )
    denied = _client_context(tmp_path, pki, pki.issue("client3"), name="c")

    assert _echo_through(server.port, by_cn)[0] == b"ping"
    assert _echo_through(server.port, by_uri)[0] == b"ping"
    assert _refused(server.port, denied)

    policy.write_text("package tunnel\nallow if {")
    server.signal(signal.SIGHUP)
    server.wait_for_log("keeping the previous policy")
    assert _echo_through(server.port, by_cn)[0] == b"ping"

    policy.write_text(
        'package tunnel\nallow if input.certificate.Subject.CommonName == "client3"\n'
    )
    server.signal(signal.SIGHUP)
    wait_for(lambda: not _refused(server.port, denied), "the new policy")
    assert _refused(server.port, by_cn)


# Start-up errors.


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        twistd(*arguments), capture_output=True, text=True, timeout=60,
        env=environment(),
    )


def test_start_up_errors_are_one_line_and_exit_2(tmp_path, pki):
    issued = pki.issue("server")
    keystore = pki.keystore(issued, "server")
    mismatched = tmp_path / "mismatched.pem"
    mismatched.write_bytes(pem(issued.cert) + key_pem(pki.issue("x").key))
    bad_policy = tmp_path / "bad.rego"
    bad_policy.write_text("package x\nallow if {")
    base = ["server", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2"]

    cases = [
        (["--keystore", str(tmp_path / "nope.pem"), "--allow-all"], "cannot read"),
        (["--keystore", str(mismatched), "--allow-all"], "does not match"),
        (["--keystore", str(keystore), "--allow-all", "--allow-cn", "x"],
         "exclude each other"),
        (["--keystore", str(keystore), "--allow-spki-pin", "md5:AAAA"],
         "not an SPKI pin"),
        (["--keystore", str(keystore), "--allow-policy", str(bad_policy),
          "--allow-query", "data.x.allow"], "does not compile"),
        (["--cert", str(keystore), "--allow-all"], "--cert and --key go together"),
    ]
    for flags, message in cases:
        result = _run(*base, "--cacert", str(pki.cacert), *flags)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (flags, result.stderr)
        assert len(lines) == 1 and message in lines[0], (flags, result.stderr)


# TLS settings.


def test_alpn_server_picks_its_first_protocol_the_client_offers(
    tmp_path, pki, backend, start_tunnel
):
    """
    With --alpn the server picks by its own preference, refuses a client
    that offers ALPN with nothing in common, and serves one that offers none.
    """
    _, keystore = _server_identity(pki, tmp_path)
    server = _server(
        start_tunnel, backend, pki, keystore, "--allow-cn", "client1",
        "--alpn", "h2,http/1.1",
    )
    peer = pki.issue("client1")

    def context(offer):
        ctx = _client_context(tmp_path, pki, peer)
        if offer:
            ctx.set_alpn_protocols(offer)
        return ctx

    with tls_connect(server.port, context(["http/1.1", "h2"])) as connection:
        connection.sendall(b"ping")
        assert recv_all(connection, 4) == b"ping"
        assert connection.selected_alpn_protocol() == "h2"
    with tls_connect(server.port, context(None)) as connection:
        assert connection.selected_alpn_protocol() is None
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        tls_connect(server.port, context(["smtp"]))


def test_max_tls_version_caps_the_handshake(tmp_path, pki, backend, start_tunnel):
    _, keystore = _server_identity(pki, tmp_path)
    server = _server(
        start_tunnel, backend, pki, keystore, "--allow-cn", "client1",
        "--max-tls-version", "TLS1.2",
    )
    context = _client_context(tmp_path, pki, pki.issue("client1"))

    with tls_connect(server.port, context) as connection:
        assert connection.version() == "TLSv1.2"
        connection.sendall(b"ping")
        assert recv_all(connection, 4) == b"ping"


def test_alpn_client_offers_its_protocols(tmp_path, pki, start_tunnel):
    """
    A client tunnel with --alpn offers its list; the server's choice is
    made by the server, here an ssl server that speaks only http/1.1.
    """
    import threading

    server_identity = pki.issue("server", ips=["127.0.0.1"])
    cert, key = pki.split(server_identity, "alpn-server")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["http/1.1"])
    listener = socket.create_server(("127.0.0.1", 0))
    selected = []

    def serve():
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as connection:
            selected.append(connection.selected_alpn_protocol())
            connection.sendall(connection.recv(4))

    threading.Thread(target=serve, daemon=True).start()
    client = _client_tunnel(
        start_tunnel, pki, tmp_path, f"127.0.0.1:{listener.getsockname()[1]}",
        "--alpn", "h2,http/1.1",
    )

    assert _plain_echo(client.port) == b"ping"
    assert selected == ["http/1.1"]
    listener.close()


# The documented openssl PKI.


def _doc_blocks(name: str) -> list[str]:
    import re

    from tests.processes import REPOSITORY

    text = (REPOSITORY / "docs" / name).read_text()
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_documented_openssl_pki_works(tmp_path, backend, start_tunnel):
    """
    The certificates docs/files.md makes with the openssl command line
    serve the documented server and client, a PKCS#12 export of them
    loads, and the documented pin command agrees with --allow-spki-pin.
    """
    from cryptography import x509

    pki_script = _doc_blocks("files.md")[0].replace("/tmp/gt-demo", str(tmp_path))
    subprocess.run(["bash", "-ec", pki_script], check=True, capture_output=True)
    p12_script = _doc_blocks("files.md")[2]
    subprocess.run(
        ["bash", "-ec", p12_script], check=True, capture_output=True, cwd=tmp_path
    )

    server = start_tunnel(
        "server", backend.address, "--keystore", "server.p12",
        "--storepass", "s3cret", "--cacert", "ca.pem", "--allow-cn", "client1",
    )
    client = start_tunnel(
        "client", f"localhost:{server.port}", "--cert", "client1-cert.pem",
        "--key", "client1-key.pem", "--cacert", "ca.pem", name="doc-client",
    )
    assert _plain_echo(client.port) == b"ping"

    pin_command = next(
        block for block in _doc_blocks("access-control.md") if "dgst" in block
    )
    printed = subprocess.run(
        ["bash", "-ec", pin_command], check=True, capture_output=True, text=True,
        cwd=tmp_path,
    ).stdout.strip()
    leaf = x509.load_pem_x509_certificate((tmp_path / "client1-cert.pem").read_bytes())
    assert f"sha256:{printed}" == spki_pin(leaf)


def test_reload_picks_up_a_new_ca_bundle(tmp_path, pki, backend, start_tunnel):
    """
    --cacert is read again on reload: a client of a CA added to the bundle
    is let in by new connections.
    """
    _, keystore = _server_identity(pki, tmp_path)
    server = _server(start_tunnel, backend, pki, keystore, "--allow-cn", "client1")
    other = Pki(tmp_path, "other")
    newcomer = _client_context(tmp_path, other, other.issue("client1"), name="new")
    newcomer.load_verify_locations(cafile=str(pki.cacert))
    assert _refused(server.port, newcomer)

    pki.cacert.write_bytes(pem(pki.root.cert, other.root.cert))
    server.signal(signal.SIGHUP)
    server.wait_for_log("reload (SIGHUP): read")

    assert _echo_through(server.port, newcomer)[0] == b"ping"
