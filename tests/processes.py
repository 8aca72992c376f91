"""
Real processes for integration tests: the dev agent, tunnels run by
C{twistd -n ghosttwist ...}, a backend, and TLS peers holding SVIDs.

Everything listens on loopback or on unix sockets in the test's temporary
folder. Waits are polls of a condition with a deadline, never fixed sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
REPOSITORY = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "domain.test"
DEADLINE = 30.0


def wait_for(condition: Callable[[], object], what: str, deadline: float = DEADLINE):
    """
    Poll C{condition} until it returns something true, and return that.

    @raise AssertionError: naming C{what} once C{deadline} seconds pass.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {deadline}s waiting for {what}")


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def environment(**extra: str) -> dict[str, str]:
    """
    A child environment whose Python path starts at this checkout, so
    twistd loads this tree's plugin however the package was installed.
    """
    env = dict(os.environ)
    env.pop("SPIFFE_ENDPOINT_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPOSITORY), env.get("PYTHONPATH", "")) if part
    )
    env.update(extra)
    return env


class Process:
    """
    A child process whose output goes to a log file the test can read.
    """

    def __init__(self, arguments: list[str], log_path: Path, env=None) -> None:
        self.arguments = arguments
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or environment(),
            cwd=str(log_path.parent),
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1, deadline: float = DEADLINE) -> str:
        def seen():
            if self.process.poll() is not None and self.log.count(text) < count:
                raise AssertionError(
                    f"process exited ({self.process.returncode}) before logging "
                    f"{text!r}:\n{self.log[-3000:]}"
                )
            return self.log.count(text) >= count

        wait_for(seen, f"{text!r} in {self.log_path.name}", deadline)
        return self.log

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float = DEADLINE) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def twistd(*arguments: str) -> list[str]:
    return [TWISTD, "-n", "--pidfile=", "ghosttwist", *arguments]


class DevAgent(Process):
    """
    The dev agent serving one socket per workload name in C{folder}.
    """

    def __init__(
        self,
        folder: Path,
        workloads=("backend", "frontend"),
        *extra: str,
        log_name: str = "agent.log",
    ):
        self.folder = folder
        self.workloads = tuple(workloads)
        self.extra = extra
        self.sockets = {name: folder / f"{name}.sock" for name in workloads}
        arguments = ["dev-agent", "--trust-domain", TRUST_DOMAIN]
        for name, path in self.sockets.items():
            arguments += ["--workload", f"{path}=spiffe://{TRUST_DOMAIN}/{name}"]
        super().__init__(twistd(*arguments, *extra), folder / log_name)
        for path in self.sockets.values():
            wait_for(lambda: path.exists() or self._exited(), f"socket {path}")
        if self.process.poll() is not None:
            raise AssertionError(f"dev agent exited:\n{self.log}")

    def _exited(self) -> bool:
        return self.process.poll() is not None

    def restarted(self) -> DevAgent:
        """
        A new agent on the same sockets (with a new CA), once this one died.
        """
        for path in self.sockets.values():
            path.unlink(missing_ok=True)
        return DevAgent(
            self.folder, self.workloads, *self.extra, log_name="agent-restarted.log"
        )

    def address(self, workload: str) -> str:
        return f"unix://{self.sockets[workload]}"

    def fetch(self, workload: str):
        """
        The workload's current X509 context, fetched as a workload would.
        """
        client = WorkloadApiClient(socket_path=self.address(workload))
        try:
            return client.fetch_x509_context(timeout=10)
        finally:
            client.close()


class Tunnel(Process):
    """
    C{twistd -n ghosttwist server|client} listening on a fresh loopback port.
    """

    def __init__(self, folder: Path, mode: str, target: str, *flags: str, name=None):
        self.port = free_port()
        self.name = name or mode
        arguments = twistd(
            mode, "--listen", f"127.0.0.1:{self.port}", "--target", target, *flags
        )
        super().__init__(arguments, folder / f"{self.name}.log")

    def wait_listening(self) -> Tunnel:
        self.wait_for_log("listening on")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def write_identity(folder: Path, name: str, chain, key, bundle) -> dict[str, Path]:
    """
    Write a chain, key and CA bundle as PEM files for the ssl module.
    """
    paths = {
        "cert": folder / f"{name}-cert.pem",
        "key": folder / f"{name}-key.pem",
        "ca": folder / f"{name}-ca.pem",
    }
    paths["cert"].write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    )
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths["ca"].write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle)
    )
    return paths


def svid_files(agent: DevAgent, workload: str, folder: Path) -> dict[str, Path]:
    """
    PEM files holding the workload's current SVID and its trust bundle.
    """
    context = agent.fetch(workload)
    svid = context.default_svid
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(
        svid.spiffe_id.trust_domain
    )
    return write_identity(
        folder, workload, svid.cert_chain, svid.private_key, bundle.x509_authorities
    )


def tls_client(files: dict[str, Path] | None, ca: Path) -> ssl.SSLContext:
    """
    An ssl client context that trusts C{ca} and presents C{files}, with no
    host name check: the peer is judged by its SPIFFE ID, not a name.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(ca))
    if files is not None:
        context.load_cert_chain(str(files["cert"]), str(files["key"]))
    return context


def tls_connect(port: int, context: ssl.SSLContext, timeout: float = 10) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(raw)


def peer_serial(connection: ssl.SSLSocket) -> str:
    from cryptography import x509

    der = connection.getpeercert(binary_form=True)
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def recv_all(connection: socket.socket, size: int | None = None) -> bytes:
    """
    Read until EOF, or until C{size} bytes have arrived.
    """
    chunks, total = [], 0
    while size is None or total < size:
        chunk = connection.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


class Backend:
    """
    A TCP backend on loopback running C{handler(connection)} in a thread per
    connection; it records how many connections reached it.
    """

    def __init__(self, handler: Callable[[socket.socket], None], port: int = 0) -> None:
        self.handler = handler
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._closed:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(connection,), daemon=True).start()

    def _run(self, connection: socket.socket) -> None:
        try:
            self.handler(connection)
        except OSError:
            pass
        finally:
            connection.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


def echo(connection: socket.socket) -> None:
    """
    Send back everything received; close after the peer's EOF.
    """
    while True:
        data = connection.recv(65536)
        if not data:
            return
        connection.sendall(data)
