"""
In-memory tests of the dev agent: its certificates, its schedule, its board.
"""

from __future__ import annotations

import datetime
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from ghosttwist.devagent.agent import AgentConfig, DevAgent
from ghosttwist.devagent.ca import (
    BACKDATE,
    CAError,
    CertificateAuthority,
    load_bundle,
    load_ca,
    mint_ca,
    mint_svid,
    parse_certificates_der,
)
from ghosttwist.devagent.state import Snapshot, SnapshotBoard

NOW = datetime.datetime(2026, 6, 1, 12, 0, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
TD = "example.org"


def _extension(certificate: x509.Certificate, kind):
    return certificate.extensions.get_extension_for_class(kind)


def _uris(certificate: x509.Certificate) -> list[str]:
    san = _extension(certificate, x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return mint_ca(TD, 24 * HOUR, NOW)


class TestMintCA:
    def test_is_a_ca(self, ca):
        constraints = _extension(ca.certificate, x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value.ca

    def test_key_usage(self, ca):
        usage = _extension(ca.certificate, x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign
        assert usage.value.crl_sign
        assert not usage.value.digital_signature

    def test_names_the_trust_domain(self, ca):
        assert _uris(ca.certificate) == [f"spiffe://{TD}"]
        assert TD in ca.certificate.subject.rfc4514_string()

    def test_p256_self_signed(self, ca):
        key = ca.certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert isinstance(key.curve, ec.SECP256R1)
        ca.certificate.verify_directly_issued_by(ca.certificate)

    def test_validity(self, ca):
        assert ca.certificate.not_valid_before_utc == NOW - BACKDATE
        assert ca.not_after == NOW + 24 * HOUR

    def test_successive_cas_differ(self, ca):
        other = mint_ca(TD, 24 * HOUR, NOW)
        assert other.serial != ca.serial
        assert other.certificate.subject != ca.certificate.subject


class TestMintSvid:
    def test_one_uri_san(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        san = _extension(svid.leaf, x509.SubjectAlternativeName).value
        assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/web")]

    def test_not_a_ca(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        constraints = _extension(svid.leaf, x509.BasicConstraints)
        assert constraints.critical
        assert not constraints.value.ca

    def test_key_usage(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        usage = _extension(svid.leaf, x509.KeyUsage)
        assert usage.critical
        assert usage.value.digital_signature
        assert not usage.value.key_cert_sign
        assert not usage.value.crl_sign

        eku = _extension(svid.leaf, x509.ExtendedKeyUsage).value
        assert set(eku) == {
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        }

    def test_key_identifiers(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        aki = _extension(svid.leaf, x509.AuthorityKeyIdentifier).value
        ski = _extension(ca.certificate, x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest
        _extension(svid.leaf, x509.SubjectKeyIdentifier)

    def test_p256_key_matches(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        assert isinstance(svid.private_key.curve, ec.SECP256R1)
        assert svid.private_key.public_key() == svid.leaf.public_key()

    def test_validity(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        assert svid.leaf.not_valid_before_utc == NOW - BACKDATE
        assert svid.not_after == NOW + HOUR

    def test_random_serials(self, ca):
        serials = {
            mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW).serial for _ in range(5)
        }
        assert len(serials) == 5

    def test_chain_verifies_against_bundle(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        verifier = (
            PolicyBuilder()
            .store(Store([ca.certificate]))
            .time(NOW)
            .build_client_verifier()
        )
        verified = verifier.verify(svid.leaf, [])
        assert verified.chain[-1] == ca.certificate

    def test_does_not_verify_against_another_ca(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        other = mint_ca(TD, 24 * HOUR, NOW)
        verifier = (
            PolicyBuilder()
            .store(Store([other.certificate]))
            .time(NOW)
            .build_client_verifier()
        )
        with pytest.raises(VerificationError):
            verifier.verify(svid.leaf, [])

    def test_ttl_clipped_to_ca(self):
        short_ca = mint_ca(TD, HOUR, NOW)
        svid = mint_svid(short_ca, f"spiffe://{TD}/web", 5 * HOUR, NOW)
        assert svid.not_after == short_ca.not_after

    def test_encodings(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        assert x509.load_der_x509_certificate(svid.chain_der()) == svid.leaf
        key = serialization.load_der_private_key(svid.key_der(), None)
        assert key.public_key() == svid.leaf.public_key()

    @settings(max_examples=25, deadline=None)
    @given(
        st.lists(
            st.from_regex(r"\A[A-Za-z0-9._-]{1,12}\Z"), min_size=1, max_size=4
        ).filter(lambda segments: not {".", ".."} & set(segments))
    )
    def test_any_path_survives(self, ca, segments):
        spiffe_id = f"spiffe://{TD}/" + "/".join(segments)
        svid = mint_svid(ca, spiffe_id, HOUR, NOW)
        assert _uris(svid.leaf) == [spiffe_id]


class TestLoadCA:
    def test_loads_matching_pair(self, ca):
        loaded = load_ca(_pem(ca.certificate), _key_pem(ca.private_key), NOW)
        assert loaded.certificate == ca.certificate
        assert not loaded.generated

    def test_key_mismatch(self, ca):
        other = mint_ca(TD, HOUR, NOW)
        with pytest.raises(CAError, match="does not match"):
            load_ca(_pem(ca.certificate), _key_pem(other.private_key), NOW)

    def test_not_a_ca(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        with pytest.raises(CAError, match="not a CA"):
            load_ca(_pem(svid.leaf), _key_pem(svid.private_key), NOW)

    def test_expired(self, ca):
        with pytest.raises(CAError, match="expired"):
            load_ca(_pem(ca.certificate), _key_pem(ca.private_key), NOW + 48 * HOUR)

    def test_not_pem(self):
        with pytest.raises(CAError):
            load_ca(b"hello", b"world", NOW)

    def test_ed25519_ca_signs(self, ca):
        key = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name.from_rfc4514_string("CN=upstream")
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(NOW - HOUR)
            .not_valid_after(NOW + HOUR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, None)
        )
        loaded = load_ca(_pem(certificate), _key_pem(key), NOW)
        svid = mint_svid(loaded, f"spiffe://{TD}/web", 5 * HOUR, NOW)
        svid.leaf.verify_directly_issued_by(certificate)
        assert svid.not_after == NOW + HOUR


class TestLoadBundle:
    def test_reads_cas(self, ca):
        other = mint_ca("other.org", HOUR, NOW)
        pem = _pem(ca.certificate) + _pem(other.certificate)
        assert load_bundle(pem) == (ca.certificate, other.certificate)

    def test_refuses_leaf(self, ca):
        svid = mint_svid(ca, f"spiffe://{TD}/web", HOUR, NOW)
        with pytest.raises(CAError, match="not a CA"):
            load_bundle(_pem(svid.leaf))


def _bundle_certificates(snapshot: Snapshot) -> list[x509.Certificate]:
    return parse_certificates_der(snapshot.own_bundle)


def _leaf(snapshot: Snapshot, path: str) -> x509.Certificate:
    return parse_certificates_der(snapshot.svids[path].chain_der)[0]


class TestDevAgentSchedule:
    """
    The rotation schedule, driven by a fake clock.
    """

    svid_ttl = 600.0
    ca_ttl = 7200.0

    def make_agent(self, ca=None, federated=None):
        clock = Clock()
        clock.advance(NOW.timestamp())
        board = SnapshotBoard()
        config = AgentConfig(
            trust_domain=TD,
            workloads={
                "/run/a.sock": f"spiffe://{TD}/a",
                "/run/b.sock": f"spiffe://{TD}/b",
            },
            svid_ttl=self.svid_ttl,
            ca_ttl=self.ca_ttl,
            federated=federated or {},
            ca=ca,
        )
        agent = DevAgent(config, board, clock)
        agent.start()
        return agent, board, clock

    def test_start_publishes_every_workload(self):
        agent, board, _clock = self.make_agent()
        snapshot = board.current()
        assert set(snapshot.svids) == {"/run/a.sock", "/run/b.sock"}
        assert snapshot.svids["/run/a.sock"].spiffe_id == f"spiffe://{TD}/a"
        assert _bundle_certificates(snapshot) == [agent.active_ca.certificate]

    def test_reissue_at_half_ttl(self):
        _agent, board, clock = self.make_agent()
        first = board.current().svids["/run/a.sock"].serial

        clock.advance(self.svid_ttl / 2 - 1)
        assert board.current().svids["/run/a.sock"].serial == first

        clock.advance(1)
        assert board.current().svids["/run/a.sock"].serial != first

    def test_reissue_all(self):
        agent, board, _clock = self.make_agent()
        before = board.current()
        agent.reissue_all()
        after = board.current()
        assert after.generation > before.generation
        for path in before.svids:
            assert after.svids[path].serial != before.svids[path].serial

    def test_rotation_publishes_bundle_before_signing(self):
        agent, board, clock = self.make_agent()
        old = agent.active_ca

        agent.rotate_ca()
        snapshot = board.current()
        bundle = _bundle_certificates(snapshot)
        assert len(bundle) == 2
        new_certificate = bundle[1]
        _leaf(snapshot, "/run/a.sock").verify_directly_issued_by(old.certificate)

        clock.advance(agent.activation_delay)
        snapshot = board.current()
        assert agent.active_ca.certificate == new_certificate
        _leaf(snapshot, "/run/a.sock").verify_directly_issued_by(new_certificate)
        assert len(_bundle_certificates(snapshot)) == 2

    def test_old_ca_dropped_when_its_last_svid_expires(self):
        agent, board, clock = self.make_agent()
        old_leaf = _leaf(board.current(), "/run/a.sock")
        agent.rotate_ca()
        clock.advance(agent.activation_delay)

        remaining = (old_leaf.not_valid_after_utc.timestamp()) - clock.seconds()
        clock.advance(remaining - 0.5)
        assert len(_bundle_certificates(board.current())) == 2

        clock.advance(0.5)
        assert _bundle_certificates(board.current()) == [agent.active_ca.certificate]

    def test_rotation_at_half_ca_ttl(self):
        agent, _board, clock = self.make_agent()
        first = agent.active_ca

        for _ in range(int(self.ca_ttl / 2 / 60)):
            clock.advance(60)
        assert len(agent.bundle) == 2

        clock.advance(agent.activation_delay)
        assert agent.active_ca is not first

    def test_svid_never_outlives_its_ca(self):
        self.svid_ttl = 5000.0
        agent, board, clock = self.make_agent()
        for _ in range(40):
            clock.advance(300)
            for path in ("/run/a.sock", "/run/b.sock"):
                leaf = _leaf(board.current(), path)
                issuer = next(
                    ca for ca in agent.bundle if ca.certificate.subject == leaf.issuer
                )
                assert leaf.not_valid_after_utc <= issuer.not_after

    def test_repeated_rotation_request_ignored_while_pending(self):
        agent, _board, _clock = self.make_agent()
        agent.rotate_ca()
        agent.rotate_ca()
        assert len(agent.bundle) == 2

    def test_given_ca_never_rotates(self):
        given = mint_ca(TD, 3 * HOUR, NOW)
        given = CertificateAuthority(given.certificate, given.private_key, False)
        agent, _board, clock = self.make_agent(ca=given)

        agent.rotate_ca()
        for _ in range(int(self.ca_ttl / 60)):
            clock.advance(60)
        assert agent.bundle == (given,)

    def test_federated_bundles_published(self, ca):
        _agent, board, _clock = self.make_agent(
            federated={"other.org": (ca.certificate,)}
        )
        snapshot = board.current()
        assert set(snapshot.bundles) == {TD, "other.org"}
        assert dict(snapshot.federated_bundles) == {
            "other.org": ca.certificate.public_bytes(serialization.Encoding.DER)
        }

    def test_stop_cancels_every_timer(self):
        agent, _board, clock = self.make_agent()
        agent.rotate_ca()
        clock.advance(agent.activation_delay)
        assert clock.getDelayedCalls()

        agent.stop()
        assert clock.getDelayedCalls() == []


class TestSnapshotBoard:
    def snapshot(self, generation: int) -> Snapshot:
        return Snapshot(generation, TD, {}, {TD: b""})

    def test_wait_returns_newer(self):
        board = SnapshotBoard()
        board.publish(self.snapshot(3))
        assert board.wait_newer(2, lambda: True).generation == 3

    def test_close_wakes_waiters(self):
        board = SnapshotBoard()
        board.publish(self.snapshot(1))
        results = []
        waiter = threading.Thread(
            target=lambda: results.append(board.wait_newer(1, lambda: True, 30))
        )
        waiter.start()
        board.close()
        waiter.join(5)
        assert not waiter.is_alive()
        assert results == [None]

    def test_publish_wakes_waiters(self):
        board = SnapshotBoard()
        board.publish(self.snapshot(1))
        results = []
        waiter = threading.Thread(
            target=lambda: results.append(board.wait_newer(1, lambda: True, 30))
        )
        waiter.start()
        board.publish(self.snapshot(2))
        waiter.join(5)
        assert results[0].generation == 2

    def test_gone_client_stops_waiting(self):
        board = SnapshotBoard()
        assert board.wait_newer(0, lambda: False) is None
