"""
Soak runs: the full-size versions of the reliability suite's load, churn,
bulk and rotation tests (tests/test_reliability_*.py), too long for CI.

Every run is bounded in count and in time (--max-seconds), uses loopback
and a temporary folder only, and prints what it measured. It asserts
nothing about speed; it exits 1 if any connection failed or any byte came
back wrong, so that a soak run can gate a release.

    python benchmarks/soak/soak.py concurrent --count 2000
    python benchmarks/soak/soak.py churn --count 20000
    python benchmarks/soak/soak.py bulk --mib 1024
    python benchmarks/soak/soak.py rotation --seconds 60
    python benchmarks/soak/soak.py agent-restart --restarts 5
    python benchmarks/soak/soak.py silent --count 5000
    python benchmarks/soak/soak.py all
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.processes import (
    Backend,
    DevAgent,
    Tunnel,
    echo,
    recv_all,
)
from tests.reliability import open_fds, rss_kib

FRONTEND = "spiffe://domain.test/frontend"
BACKEND = "spiffe://domain.test/backend"


class Run:
    """
    An agent, a backend and a client/server pair in a temporary folder.
    """

    def __init__(
        self, folder: Path, handler=echo, *agent_flags: str, agent=None
    ) -> None:
        self.folder = folder
        self.agent = agent or DevAgent(folder, ("backend", "frontend"), *agent_flags)
        self.backend = Backend(handler)
        self.server = Tunnel(
            folder,
            "server",
            self.backend.address,
            "--use-workload-api-addr",
            self.agent.address("backend"),
            "--allow-uri",
            FRONTEND,
        ).wait_listening()
        self.client = Tunnel(
            folder,
            "client",
            self.server.address,
            "--use-workload-api-addr",
            self.agent.address("frontend"),
            "--verify-uri",
            BACKEND,
        ).wait_listening()

    def figures(self) -> dict[str, int]:
        return {
            f"{tunnel.name} {what}": measure(tunnel.process.pid)
            for tunnel in (self.client, self.server)
            for what, measure in (("fds", open_fds), ("rss KiB", rss_kib))
        }

    def stop(self) -> None:
        for process in (self.client, self.server, self.agent):
            process.stop()
        self.backend.close()


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def concurrent(run: Run, count: int, limit: float) -> int:
    """
    Open C{count} connections through the pair, all held at once; each
    echoes its own number.
    """
    end = _deadline(limit)
    connections, failures = [], 0
    try:
        for _ in range(count):
            if time.monotonic() > end:
                break
            connections.append(
                socket.create_connection(("127.0.0.1", run.client.port), timeout=60)
            )
        for number, connection in enumerate(connections):
            connection.sendall(b"%08d" % number)
        for number, connection in enumerate(connections):
            if recv_all(connection, 8) != b"%08d" % number:
                failures += 1
        print(f"concurrent: {len(connections)} held at once, {failures} failed")
        print(f"  while held: {run.figures()}")
    finally:
        for connection in connections:
            connection.close()
    return failures + (count - len(connections))


def churn(run: Run, count: int, limit: float) -> int:
    """
    Open, use and close C{count} connections, eight at a time; compare the
    tunnels' descriptors and memory before and after.
    """
    end = _deadline(limit)
    before = run.figures()

    def one(number: int) -> bool:
        if time.monotonic() > end:
            return False
        payload = b"%08d" % number
        try:
            with socket.create_connection(
                ("127.0.0.1", run.client.port), timeout=30
            ) as c:
                c.sendall(payload)
                return recv_all(c, 8) == payload
        except OSError:
            return False

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(count)))
    elapsed = time.monotonic() - started
    time.sleep(2)  # let the last closes land before the figures; a report, not a test
    after = run.figures()
    failures = results.count(False)
    print(
        f"churn: {count} connections in {elapsed:.1f}s "
        f"({count / elapsed:.0f}/s), {failures} failed"
    )
    for name in before:
        print(f"  {name}: {before[name]} -> {after[name]}")
    return failures


def bulk(folder: Path, mib: int, limit: float) -> int:
    """
    Send C{mib} MiB each way at once between a client and the backend and
    compare SHA-256 digests at both ends.
    """
    size = mib * 1024 * 1024
    results: dict[str, str] = {}

    def duplex(connection: socket.socket, name: str, seed: bytes) -> None:
        sent = hashlib.sha256()
        block = hashlib.shake_256(seed).digest(1 << 20)

        def send() -> None:
            for offset in range(0, size, len(block)):
                chunk = block[: size - offset]
                connection.sendall(chunk)
                sent.update(chunk)
            connection.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        connection.settimeout(limit)
        while chunk := connection.recv(1 << 18):
            digest.update(chunk)
        sender.join()
        results[f"{name} sent"] = sent.hexdigest()
        results[f"{name} received"] = digest.hexdigest()

    run = Run(folder, lambda connection: duplex(connection, "backend", b"backend"))
    try:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", run.client.port), timeout=60) as c:
            duplex(c, "client", b"client")
        while "backend received" not in results and time.monotonic() < started + limit:
            time.sleep(0.1)
        elapsed = time.monotonic() - started
    finally:
        run.stop()

    intact = results.get("client sent") == results.get(
        "backend received"
    ) and results.get("backend sent") == results.get("client received")
    print(
        f"bulk: {mib} MiB each way at once in {elapsed:.1f}s "
        f"({2 * mib / elapsed:.0f} MiB/s total), SHA-256 equal: {intact}"
    )
    return 0 if intact else 1


def rotation(folder: Path, seconds: float) -> int:
    """
    New connections through the pair for C{seconds} while the agent
    re-issues SVIDs every second and rotates its CA every 20 seconds.
    """
    run = Run(folder, echo, "--svid-ttl", "2s")
    done = failures = 0
    try:
        end = time.monotonic() + seconds
        next_ca = time.monotonic() + 20
        while time.monotonic() < end:
            if time.monotonic() >= next_ca:
                run.agent.signal(signal.SIGUSR2)
                next_ca += 20
            try:
                with socket.create_connection(
                    ("127.0.0.1", run.client.port), timeout=15
                ) as c:
                    c.sendall(b"rotating")
                    ok = recv_all(c, 8) == b"rotating"
            except OSError:
                ok = False
            done += ok
            failures += not ok
        updates = run.server.log.count("identity updated")
    finally:
        run.stop()
    print(
        f"rotation: {done} connections over {seconds:.0f}s, {failures} failed, "
        f"{updates} identity updates in the server"
    )
    return failures


def silent(folder: Path, count: int, limit: float) -> int:
    """
    Open C{count} connections to a server tunnel that never send a byte,
    serve a legitimate client through the pair while they are open, and
    count how many the tunnel cuts at its --connect-timeout of 5s.
    """
    run = Run.__new__(Run)
    run.folder = folder
    run.agent = DevAgent(folder, ("backend", "frontend"))
    run.backend = Backend(echo)
    run.server = Tunnel(
        folder,
        "server",
        run.backend.address,
        "--use-workload-api-addr",
        run.agent.address("backend"),
        "--allow-uri",
        FRONTEND,
        "--connect-timeout",
        "5s",
    ).wait_listening()
    run.client = Tunnel(
        folder,
        "client",
        run.server.address,
        "--use-workload-api-addr",
        run.agent.address("frontend"),
        "--verify-uri",
        BACKEND,
    ).wait_listening()
    end = _deadline(limit)
    held, cut, served = [], 0, False
    try:
        for _ in range(count):
            if time.monotonic() > end:
                break
            held.append(
                socket.create_connection(("127.0.0.1", run.server.port), timeout=60)
            )
        with socket.create_connection(("127.0.0.1", run.client.port), timeout=60) as c:
            c.sendall(b"served")
            served = recv_all(c, 6) == b"served"
        for connection in held:
            try:
                cut += connection.recv(1) == b""
            except ConnectionError:
                cut += 1
            except OSError:
                pass
    finally:
        for connection in held:
            connection.close()
        run.stop()
    print(
        f"silent: {len(held)} silent connections, {cut} cut at the timeout, "
        f"legitimate client served meanwhile: {served}"
    )
    return (len(held) - cut) + (0 if served else 1) + (count - len(held))


def agent_restart(folder: Path, restarts: int) -> int:
    """
    Kill and restart the agent C{restarts} times between batches of 200
    connections. The agent signs with a CA given by --ca, as a SPIRE agent
    keeps its trust domain's CA across restarts, so no connection may fail.
    """
    root = folder / "ca"
    root.mkdir()
    from tests.test_reliability_certs_process import _ca
    from tests.test_reliability_faults_process import _agent_with_ca

    run = Run(folder, agent=_agent_with_ca(root, _ca("soak root")))
    done = failures = 0
    try:
        for number in range(restarts):
            for _ in range(200):
                try:
                    with socket.create_connection(
                        ("127.0.0.1", run.client.port), timeout=15
                    ) as c:
                        c.sendall(b"restart")
                        ok = recv_all(c, 7) == b"restart"
                except OSError:
                    ok = False
                done += ok
                failures += not ok
            run.agent.process.kill()
            run.agent.wait()
            run.agent = run.agent.restarted()
    finally:
        run.stop()
    print(f"agent-restart: {restarts} restarts, {done} connections, {failures} failed")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument(
        "scenario",
        choices=[
            "concurrent",
            "churn",
            "bulk",
            "rotation",
            "agent-restart",
            "silent",
            "all",
        ],
    )
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=900.0,
        help="give up on a scenario after this long",
    )
    arguments = parser.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    failures = 0
    chosen = arguments.scenario
    with tempfile.TemporaryDirectory(prefix="ghosttwist-soak-") as name:
        folder = Path(name)
        if chosen in ("concurrent", "churn", "all"):
            (folder / "pair").mkdir()
            run = Run(folder / "pair")
            try:
                if chosen in ("concurrent", "all"):
                    failures += concurrent(
                        run, arguments.count or 2000, arguments.max_seconds
                    )
                if chosen in ("churn", "all"):
                    failures += churn(
                        run, arguments.count or 20000, arguments.max_seconds
                    )
            finally:
                run.stop()
        if chosen in ("bulk", "all"):
            (folder / "bulk").mkdir()
            failures += bulk(folder / "bulk", arguments.mib, arguments.max_seconds)
        if chosen in ("rotation", "all"):
            (folder / "rotation").mkdir()
            failures += rotation(
                folder / "rotation", min(arguments.seconds, arguments.max_seconds)
            )
        if chosen in ("silent", "all"):
            (folder / "silent").mkdir()
            failures += silent(
                folder / "silent", arguments.count or 5000, arguments.max_seconds
            )
        if chosen in ("agent-restart", "all"):
            (folder / "restart").mkdir()
            failures += agent_restart(folder / "restart", arguments.restarts)
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
