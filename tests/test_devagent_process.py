"""
Integration tests: the real C{twistd -n ghosttwist dev-agent} in a process.

Each test starts the agent with its sockets in the test's temporary folder,
talks to it with the C{spiffe} package's client or with raw gRPC, and waits
for conditions (a socket that answers, a serial that changed) with a
deadline, never for a fixed time.
"""

from __future__ import annotations

import datetime
import functools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from ghosttwist.devagent.agent import DevAgent
from ghosttwist.devagent.ca import mint_ca, parse_certificates_der

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
REPOSITORY = Path(__file__).resolve().parent.parent
TD = "example.org"
HEADER = (("workload.spiffe.io", "true"),)
DEADLINE = 20.0


def _environment() -> dict[str, str]:
    """
    The agent's environment: our checkout first on the path, so twistd finds
    this tree's plugin whichever way the package was installed.
    """
    environment = dict(os.environ)
    paths = [str(REPOSITORY), environment.get("PYTHONPATH", "")]
    environment["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    return environment


def _twistd(*arguments: str) -> list[str]:
    return [TWISTD, "-n", "--pidfile=", "ghosttwist", "dev-agent", *arguments]


def _wait_for(condition, what: str, deadline: float = DEADLINE):
    """
    Poll C{condition} until it returns something true; fail after C{deadline}.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


class Agent:
    """
    A running dev agent process and the sockets it serves.
    """

    def __init__(self, folder: Path, arguments: list[str], sockets: list[str]):
        self.folder = folder
        self.sockets = sockets
        self.log_path = folder / "agent.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                _twistd(*arguments),
                cwd=folder,
                env=_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        for path in self.sockets:
            _wait_for(functools.partial(self._answers, path), f"the agent on {path}")

    def _answers(self, path: str) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"the agent exited early:\n{self.log()}")
        if not os.path.exists(path):
            return False
        with grpc.insecure_channel(f"unix:{path}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            call = stub.FetchX509Bundles(
                workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=2
            )
            try:
                next(call)
            except grpc.RpcError:
                return False
            finally:
                call.cancel()
        return True

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@pytest.fixture
def start_agent(tmp_path):
    """
    Start agents in C{tmp_path}; each is stopped (then killed) on teardown.
    """
    agents: list[Agent] = []

    def start(*extra: str, workloads: dict[str, str] | None = None) -> Agent:
        if workloads is None:
            workloads = {"a.sock": f"spiffe://{TD}/a"}
        arguments = ["--trust-domain", TD, *extra]
        sockets = []
        for name, spiffe_id in workloads.items():
            path = str(tmp_path / "sockets" / name)
            sockets.append(path)
            arguments += ["--workload", f"{path}={spiffe_id}"]

        agent = Agent(tmp_path, arguments, sockets)
        agents.append(agent)
        agent.wait_ready()
        return agent

    yield start

    for agent in agents:
        agent.stop()


class Stream:
    """
    An open Workload API stream, read by a thread into a queue.
    """

    def __init__(self, path: str, method: str = "FetchX509SVID"):
        self._channel = grpc.insecure_channel(f"unix:{path}")
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        request = {
            "FetchX509SVID": workload_pb2.X509SVIDRequest(),
            "FetchX509Bundles": workload_pb2.X509BundlesRequest(),
        }[method]
        self.call = getattr(stub, method)(request, metadata=HEADER)
        self.messages: queue.Queue = queue.Queue()
        self.ended = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put((time.monotonic(), message))
        except grpc.RpcError:
            pass
        finally:
            self.ended.set()

    def next(self, deadline: float = DEADLINE):
        try:
            return self.messages.get(timeout=deadline)
        except queue.Empty:
            pytest.fail("no message on the stream in time")

    def close(self) -> None:
        self.call.cancel()
        self._reader.join(5)
        self._channel.close()


@pytest.fixture
def open_stream():
    streams: list[Stream] = []

    def open_(path: str, method: str = "FetchX509SVID") -> Stream:
        stream = Stream(path, method)
        streams.append(stream)
        return stream

    yield open_

    for stream in streams:
        stream.close()


def _leaf(response) -> x509.Certificate:
    return parse_certificates_der(response.svids[0].x509_svid)[0]


def _bundle(response) -> list[x509.Certificate]:
    return parse_certificates_der(response.svids[0].bundle)


def _signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def test_fetch_x509_context(start_agent):
    agent = start_agent()
    client = WorkloadApiClient(socket_path="unix://" + agent.sockets[0])
    try:
        context = client.fetch_x509_context(timeout=10)
    finally:
        client.close()

    svid = context.default_svid
    assert str(svid.spiffe_id) == f"spiffe://{TD}/a"
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(
        svid.spiffe_id.trust_domain
    )
    authorities = list(bundle.x509_authorities)
    assert len(authorities) == 1
    assert _signed_by(svid.leaf, authorities[0])
    assert "issued X509-SVID spiffe://example.org/a serial=" in agent.log()


def test_each_socket_serves_its_own_workload(start_agent):
    agent = start_agent(
        workloads={"a.sock": f"spiffe://{TD}/a", "b.sock": f"spiffe://{TD}/b/c"}
    )
    served = []
    for path in agent.sockets:
        client = WorkloadApiClient(socket_path="unix://" + path)
        try:
            served.append(str(client.fetch_x509_svid(timeout=10).spiffe_id))
        finally:
            client.close()
    assert served == [f"spiffe://{TD}/a", f"spiffe://{TD}/b/c"]


def test_sigusr1_sends_new_svid_on_open_stream(start_agent, open_stream):
    agent = start_agent()
    stream = open_stream(agent.sockets[0])
    _, first = stream.next()

    agent.signal(signal.SIGUSR1)
    _, second = stream.next()

    assert _leaf(second).serial_number != _leaf(first).serial_number
    assert second.svids[0].spiffe_id == f"spiffe://{TD}/a"
    assert second.svids[0].x509_svid_key != first.svids[0].x509_svid_key


def test_sigusr2_publishes_bundle_before_signing(start_agent, open_stream):
    agent = start_agent()
    stream = open_stream(agent.sockets[0])
    _, first = stream.next()
    (old_ca,) = _bundle(first)
    assert _signed_by(_leaf(first), old_ca)

    agent.signal(signal.SIGUSR2)
    grown_at, grown = stream.next()
    bundle = _bundle(grown)
    assert len(bundle) == 2
    assert _signed_by(_leaf(grown), old_ca)
    new_ca = next(ca for ca in bundle if ca != old_ca)

    signed_at, signed = stream.next()
    assert _signed_by(_leaf(signed), new_ca)
    assert len(_bundle(signed)) == 2
    assert signed_at - grown_at >= DevAgent.activation_delay * 0.5


def test_bundles_stream_follows_rotation(start_agent, open_stream):
    agent = start_agent()
    stream = open_stream(agent.sockets[0], "FetchX509Bundles")
    _, first = stream.next()
    assert len(parse_certificates_der(first.bundles[TD])) == 1

    agent.signal(signal.SIGUSR2)
    _, second = stream.next()
    assert len(parse_certificates_der(second.bundles[TD])) == 2


def test_svid_reissued_at_half_its_ttl(start_agent, open_stream):
    agent = start_agent("--svid-ttl", "2s")
    stream = open_stream(agent.sockets[0])
    _, first = stream.next()

    _, second = stream.next(deadline=10)
    assert _leaf(second).serial_number != _leaf(first).serial_number


def test_ca_rotates_on_its_own_and_old_ca_leaves(start_agent, open_stream):
    agent = start_agent("--ca-ttl", "4s", "--svid-ttl", "2s")
    stream = open_stream(agent.sockets[0], "FetchX509Bundles")
    _, first = stream.next()
    (old_ca,) = parse_certificates_der(first.bundles[TD])

    sizes = []
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        _, message = stream.next()
        bundle = parse_certificates_der(message.bundles[TD])
        sizes.append(len(bundle))
        if len(bundle) == 1:
            break
    assert sizes[0] == 2, sizes
    assert sizes[-1] == 1, sizes
    assert bundle[0] != old_ca


def test_closed_streams_free_their_threads(start_agent):
    agent = start_agent()
    for _ in range(80):
        stream = Stream(agent.sockets[0])
        stream.next()
        stream.close()

    client = WorkloadApiClient(socket_path="unix://" + agent.sockets[0])
    try:
        assert str(client.fetch_x509_svid(timeout=10).spiffe_id).endswith("/a")
    finally:
        client.close()


def test_many_concurrent_streams_all_get_updates(start_agent, open_stream):
    agent = start_agent()
    streams = [open_stream(agent.sockets[0]) for _ in range(32)]
    firsts = [_leaf(stream.next()[1]).serial_number for stream in streams]

    agent.signal(signal.SIGUSR1)
    for stream, first in zip(streams, firsts, strict=True):
        assert _leaf(stream.next()[1]).serial_number != first


def test_call_without_security_header_refused(start_agent):
    agent = start_agent()
    with grpc.insecure_channel(f"unix:{agent.sockets[0]}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "security header missing from request"


def test_jwt_unimplemented(start_agent):
    agent = start_agent()
    with grpc.insecure_channel(f"unix:{agent.sockets[0]}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=["x"]),
                metadata=HEADER,
                timeout=10,
            )

    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _write_ca(folder: Path, name: str, trust_domain: str):
    now = datetime.datetime.now(datetime.UTC)
    ca = mint_ca(trust_domain, datetime.timedelta(hours=2), now)
    certificate_path = folder / f"{name}.pem"
    key_path = folder / f"{name}-key.pem"
    certificate_path.write_bytes(
        ca.certificate.public_bytes(serialization.Encoding.PEM)
    )
    key_path.write_bytes(
        ca.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca, certificate_path, key_path


def test_federated_bundle_is_sent(start_agent, tmp_path):
    foreign, bundle_path, _ = _write_ca(tmp_path, "other", "other.org")
    agent = start_agent("--federate-with", f"other.org={bundle_path}")

    client = WorkloadApiClient(socket_path="unix://" + agent.sockets[0])
    try:
        context = client.fetch_x509_context(timeout=10)
        bundles = client.fetch_x509_bundles(timeout=10)
    finally:
        client.close()

    for bundle_set in (context.x509_bundle_set, bundles):
        domains = {str(bundle.trust_domain) for bundle in bundle_set.bundles}
        assert domains == {TD, "other.org"}
    other = next(b for b in bundles.bundles if str(b.trust_domain) == "other.org")
    assert list(other.x509_authorities) == [foreign.certificate]


def test_given_ca_signs(start_agent, tmp_path):
    given, certificate_path, key_path = _write_ca(tmp_path, "ca", TD)
    agent = start_agent(
        "--ca", str(certificate_path), "--ca-key", str(key_path), "--svid-ttl", "5h"
    )

    client = WorkloadApiClient(socket_path="unix://" + agent.sockets[0])
    try:
        context = client.fetch_x509_context(timeout=10)
    finally:
        client.close()

    svid = context.default_svid
    assert _signed_by(svid.leaf, given.certificate)
    assert svid.leaf.not_valid_after_utc == given.not_after


def _assert_clean_stop(agent: Agent) -> None:
    """
    Stop C{agent} with SIGTERM and check it shut down in order.

    twistd ends by raising the signal that stopped it again, so the exit
    status says "terminated by SIGTERM" after an orderly shutdown.
    """
    assert agent.stop() in (0, -signal.SIGTERM)
    assert "Server Shut Down." in agent.log()
    assert "Traceback" not in agent.log()


def test_stale_socket_replaced_and_removed_on_stop(start_agent, tmp_path):
    stale = tmp_path / "sockets" / "a.sock"
    stale.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()

    agent = start_agent()
    _assert_clean_stop(agent)
    assert not stale.exists()


def test_stop_ends_open_streams(start_agent, open_stream):
    agent = start_agent()
    streams = [open_stream(agent.sockets[0]) for _ in range(8)]
    for stream in streams:
        stream.next()

    _assert_clean_stop(agent)
    for stream in streams:
        assert stream.ended.wait(DEADLINE)


VALID = ["--workload", "/tmp/never-bound.sock=spiffe://example.org/a"]


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(VALID, id="no-trust-domain"),
        pytest.param(["--trust-domain", TD], id="no-workload"),
        pytest.param(["--trust-domain", "Example.org", *VALID], id="bad-td"),
        pytest.param(
            ["--trust-domain", TD, "--workload", "/tmp/x.sock=spiffe://example.org//a"],
            id="bad-spiffe-id",
        ),
        pytest.param(
            ["--trust-domain", TD, "--workload", "/tmp/x.sock=spiffe://other.org/a"],
            id="foreign-id",
        ),
        pytest.param(["--trust-domain", TD, *VALID, "--ca", "ca.pem"], id="no-ca-key"),
        pytest.param(["--trust-domain", TD, *VALID, "--svid-ttl", "5"], id="bad-ttl"),
        pytest.param(
            [
                "--trust-domain",
                TD,
                "--workload",
                "/dev/null/x.sock=spiffe://example.org/a",
            ],
            id="bad-socket-folder",
        ),
        pytest.param(
            ["--trust-domain", TD, *VALID, "--federate-with", "other.org=missing.pem"],
            id="missing-bundle",
        ),
    ],
)
def test_bad_flags_exit_with_one_line(arguments, tmp_path):
    result = subprocess.run(
        _twistd(*arguments),
        cwd=tmp_path,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0]
