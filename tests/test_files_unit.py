"""
Loading identities from files, reloading them, Rego policies and the flag
rules, all in memory (the files live in the test's temporary folder).
"""

from __future__ import annotations

import signal

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from ghosttwist.auth.rego import PolicyError, PolicyHolder, RegoPolicy, input_document
from ghosttwist.files import (
    FileIdentityError,
    FileSource,
    IdentityFiles,
    load_identity,
)
from ghosttwist.options import ClientOptions, ServerOptions
from tests.pki import Pki, key_pem, mint, pem


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


def _files(pki: Pki, keystore) -> IdentityFiles:
    return IdentityFiles(keystore=str(keystore), cacert=str(pki.cacert))


def test_pem_in_odd_order_is_served_leaf_first(pki):
    issued = pki.issue("server")
    identity = load_identity(_files(pki, pki.keystore(issued, "k", order="odd")))

    assert [c.subject for c in identity.chain] == [
        issued.cert.subject, pki.intermediate.cert.subject
    ]
    assert identity.bundles == {"cacert": (pki.root.cert,)}
    assert identity.source == "files"


def test_split_pair_and_pkcs12_load_the_same_identity(pki):
    issued = pki.issue("server", key_type="rsa")
    cert, key = pki.split(issued, "pair")

    pair = load_identity(
        IdentityFiles(cert=str(cert), key=str(key), cacert=str(pki.cacert))
    )
    p12 = load_identity(
        IdentityFiles(
            keystore=str(pki.pkcs12(issued, "p", b"pw")), password="pw",
            cacert=str(pki.cacert),
        )
    )

    assert pair.chain == p12.chain == (issued.cert, pki.intermediate.cert)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda pki, path: path.unlink(), "cannot read"),
        (lambda pki, path: path.write_bytes(path.read_bytes()[:200]), "half-written"),
        (lambda pki, path: path.write_bytes(b"garbage"), "PKCS#12"),
        (
            lambda pki, path: path.write_bytes(
                pem(pki.issue("a").cert) + key_pem(pki.issue("b").key)
            ),
            "does not match",
        ),
        (
            lambda pki, path: path.write_bytes(key_pem(pki.issue("a").key, b"pw")),
            "no PEM certificate",
        ),
        (
            lambda pki, path: path.write_bytes(
                pem(pki.issue("a").cert) + key_pem(mint("x").key, b"pw")
            ),
            "give --storepass",
        ),
    ],
    ids=["missing", "truncated", "garbage", "mismatched", "key-only", "locked"],
)
def test_broken_files_are_one_line_errors(pki, damage, message):
    path = pki.keystore(pki.issue("server"), "k")
    damage(pki, path)

    with pytest.raises(FileIdentityError, match=message) as caught:
        load_identity(_files(pki, path))
    assert "\n" not in str(caught.value)


def test_system_trust_store_is_the_default(pki):
    keystore = pki.keystore(pki.issue("s"), "k")
    identity = load_identity(IdentityFiles(keystore=str(keystore)))

    assert list(identity.bundles) == ["system"]
    assert identity.bundles["system"]


def test_file_source_reloads_on_timer_and_keeps_identity_on_failure(pki):
    reactor = MemoryReactorClock()
    path = pki.keystore(pki.issue("first"), "k")
    hooks = []
    source = FileSource(_files(pki, path), reactor, 10.0, [lambda: hooks.append(1)])
    seen = []
    source.subscribe(seen.append)
    previous = signal.getsignal(signal.SIGUSR1)

    source.start()
    try:
        assert signal.getsignal(signal.SIGUSR1) == source._signalled
        second = pki.issue("second")
        pki.keystore(second, "k")
        reactor.advance(10)
        assert seen[-1].leaf == second.cert
        assert hooks == [1]

        path.write_bytes(b"half")
        reactor.advance(10)
        assert len(seen) == 2
        assert source.current.leaf == second.cert
    finally:
        source.stop()

    assert signal.getsignal(signal.SIGUSR1) == previous
    assert not reactor.getDelayedCalls()


def test_reload_signals_are_handled_before_the_first_identity_goes_out(pki):
    """
    Delivering the first identity starts the listener: from the moment a
    tunnel can be seen listening, SIGUSR1 and SIGHUP reload, never kill.
    """
    path = pki.keystore(pki.issue("first"), "k")
    source = FileSource(_files(pki, path), MemoryReactorClock(), 0, [])
    handlers = []
    source.subscribe(
        lambda identity: handlers.extend(
            signal.getsignal(number) for number in (signal.SIGUSR1, signal.SIGHUP)
        )
    )

    source.start()
    source.stop()

    assert handlers == [source._signalled, source._signalled]


POLICY = """
package tunnel

allow if input.certificate.Subject.CommonName == "client1"
allow if input.certificate.SpiffeID == "spiffe://example.test/x"
"""


def test_rego_policy_decides_by_the_input_document(tmp_path):
    path = tmp_path / "p.rego"
    path.write_text(POLICY)
    policy = RegoPolicy(str(path), "data.tunnel.allow")

    assert policy.evaluate([mint("client1").cert]).allowed
    assert policy.evaluate([mint("y", uris=["spiffe://example.test/x"]).cert]).allowed
    assert not policy.evaluate([mint("client2").cert]).allowed


def test_input_document_shape():
    peer = mint("c", ou="o", dns=["d.test"], ips=["10.0.0.1"],
                uris=["spiffe://example.test/w"])

    certificate = input_document([peer.cert])["certificate"]

    assert certificate["Subject"]["CommonName"] == "c"
    assert certificate["Subject"]["OrganizationalUnit"] == ["o"]
    assert certificate["DNSNames"] == ["d.test"]
    assert certificate["IPAddresses"] == ["10.0.0.1"]
    assert certificate["URIs"][0]["Host"] == "example.test"
    assert certificate["URIs"][0]["Path"] == "/w"
    assert "User" not in certificate["URIs"][0]
    assert certificate["SpiffeID"] == "spiffe://example.test/w"
    assert certificate["SerialNumber"] == str(peer.cert.serial_number)


GLOB_POLICY = """
package gate

patterns := ["ok.test/svc/*", "ok.test/admin"]

allow if {
    some uri in input.certificate.URIs
    uri.Scheme == "spiffe"
    not uri.User
    not uri.RawQuery
    not uri.Fragment
    some pattern in patterns
    glob.match(pattern, [".", "/"], concat("", [uri.Host, uri.Path]))
}
"""


@pytest.mark.parametrize(
    "uri, allowed",
    [
        ("spiffe://ok.test/svc/web", True),
        ("spiffe://ok.test/admin", True),
        ("spiffe://ok.test/svc/web/deeper", False),
        ("spiffe://ok.test/svc/web?x=1", False),
        ("spiffe://bad.test/admin", False),
    ],
)
def test_absent_uri_parts_are_undefined_for_policies(tmp_path, uri, allowed):
    """
    URI parts that are empty are left out of the input, so a policy can
    require them absent with C{not}.
    """
    path = tmp_path / "gate.rego"
    path.write_text(GLOB_POLICY)
    policy = RegoPolicy(str(path), "data.gate.allow")

    assert policy.evaluate([mint("p", uris=[uri]).cert]).allowed is allowed


def test_policy_from_an_opa_bundle(tmp_path):
    import io
    import json
    import tarfile

    bundle = tmp_path / "bundle.tar.gz"
    with tarfile.open(bundle, "w:gz") as archive:
        for name, content in (
            ("/gate/policy.rego",
             b"package gate\n"
             b"allow if input.certificate.Subject.CommonName in data.names\n"),
            ("/data.json", json.dumps({"names": ["c1"]}).encode()),
            ("/.manifest", b"{}"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    policy = RegoPolicy(str(bundle), "data.gate.allow")

    assert policy.evaluate([mint("c1").cert]).allowed
    assert not policy.evaluate([mint("c2").cert]).allowed


def test_broken_policy_refuses_load_and_reload_keeps_the_old(tmp_path):
    path = tmp_path / "p.rego"
    path.write_text("package tunnel\nallow if {")
    with pytest.raises(PolicyError, match="does not compile"):
        RegoPolicy(str(path), "data.tunnel.allow")

    path.write_text(POLICY)
    holder = PolicyHolder(str(path), "data.tunnel.allow")
    path.write_text("package tunnel\nallow if {")
    holder.reload()

    assert holder.evaluate([mint("client1").cert]).allowed


def _parse(options, pki, *flags):
    keystore = pki.keystore(pki.issue("s"), "k")
    options.parseOptions(
        ["--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
         "--keystore", str(keystore), "--cacert", str(pki.cacert), *flags]
    )
    return options.config


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "needs an authorization flag"),
        (["--allow-all", "--allow-cn", "a"], "exclude each other"),
        (["--disable-authentication", "--allow-ou", "a"], "exclude each other"),
        (["--allow-spki-pin", "sha256:" + "A" * 43 + "=", "--allow-cn", "a"],
         "exclude each other"),
        (["--allow-policy", "p.rego"], "go together"),
        (["--allow-ip", "nowhere"], "not an IP address"),
        (["--max-tls-version", "TLS1.1", "--allow-all"], "TLS1.2 or TLS1.3"),
        (["--timed-reload", "soon", "--allow-all"], "--timed-reload"),
    ],
)
def test_server_flag_rules(pki, flags, message):
    with pytest.raises(usage.UsageError, match=message):
        _parse(ServerOptions(), pki, *flags)


def test_server_name_flags_combine(pki):
    config = _parse(
        ServerOptions(), pki, "--allow-cn", "a", "--allow-dns", "b",
        "--allow-uri", "https://x/y",
    )

    assert config.names.common_names == ("a",)
    assert config.names.dns_names == ("b",)
    assert config.allow_uris == ()
    assert config.files.keystore.endswith("k.pem")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--verify-spki-pin", "sha256:" + "A" * 43 + "=", "--verify-cn", "a"],
         "exclude each other"),
        (["--verify-query", "data.x"], "go together"),
    ],
)
def test_client_flag_rules(pki, flags, message):
    with pytest.raises(usage.UsageError, match=message):
        _parse(ClientOptions(), pki, *flags)


def test_client_checks_target_host_unless_overridden(pki):
    assert _parse(ClientOptions(), pki).server_name == "127.0.0.1"
    overridden = _parse(ClientOptions(), pki, "--override-server-name", "a.test")
    assert overridden.server_name == "a.test"
    pin = "sha256:" + "A" * 43 + "="
    pinned = _parse(ClientOptions(), pki, "--verify-spki-pin", pin)
    assert pinned.server_name is None


def test_client_pin_goes_with_disable_authentication(pki):
    config = _parse(
        ClientOptions(), pki, "--verify-spki-pin", "sha256:" + "A" * 43 + "=",
        "--disable-authentication",
    )

    assert config.files.keystore is None


def test_name_flags_need_files(pki):
    options = ServerOptions()
    with pytest.raises(usage.UsageError, match="needs identities from files"):
        options.parseOptions(
            ["--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
             "--use-workload-api-addr", "unix:///x.sock", "--allow-cn", "a"]
        )
