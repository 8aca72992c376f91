"""
Side-by-side speed of ghosttwist, stunnel and the direct path, on loopback.

For each path (direct, stunnel, ghosttwist; ghosttwist with --workers when
the flag exists) it measures, in the same run:

- bulk MB/s with iperf3 through the pair;
- keep-alive requests/s, p50 and p99 latency with wrk against nginx;
- new connections/s with wrk sending ``Connection: close``;
- memory of both tunnel processes per idle open connection pair (1,000
  idle connections opened through the pair; VmRSS delta / count).

Every figure is reported as a ratio to the direct path of the same round,
over several rounds (min / median / max), and the table is written into
docs/performance.md between the results markers. It is a measurement,
not a test: nothing here asserts a time.

Everything listens on 127.0.0.1 and is started and stopped by this script.

Usage: python benchmarks/run.py [--rounds 3] [--seconds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

PACKAGES = {
    "iperf3": "iperf3",
    "wrk": "wrk",
    "nginx": "nginx-light",
    "stunnel4": "stunnel4",
}
TRUST_DOMAIN = "domain.test"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/frontend"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/backend"

# ghostunnel 1.7.1 as quoted in issue 7 (2-core machine, same method); not
# measured here: ghostunnel is not packaged for Debian.
GHOSTUNNEL = {
    "bulk": "0.215",
    "keepalive": "0.19-0.21",
    "close": "0.059-0.068",
    "p99": "3.5 ms",
    "memory": "105",
}
TARGETS = {"bulk": 0.26, "keepalive": 0.24, "close": 0.075, "p99": 3.5, "memory": 100}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="per load run")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections")
    parser.add_argument("--paths", default="", help="comma list; default: all")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the tunnels into DIR")
    parser.add_argument("--no-write", action="store_true", help="leave the doc alone")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 60:
        parser.error("--rounds must be 1-20 and --seconds 1-60")
    if not 10 <= args.idle <= 5000:
        parser.error("--idle must be 10-5000")
    if not (Path(sys.executable).parent / "twistd").exists():
        parser.error(
            f"no twistd next to {sys.executable}: run it with the Python of a "
            "virtualenv where ghosttwist is installed (. .venv/bin/activate)"
        )

    install_tools()
    _raise_fd_limit(args.idle * 4 + 512)
    with tempfile.TemporaryDirectory(prefix="gt-bench-") as tmp:
        bench = Bench(Path(tmp), args)
        try:
            results = bench.run()
        finally:
            bench.stop_all()
    table = render(results, args)
    print(table)
    if not args.no_write:
        write_doc(table)
    return 0


def install_tools() -> None:
    """
    Install the Debian packages the measurement needs, when missing and root.
    """
    missing = [pkg for tool, pkg in PACKAGES.items() if not _which(tool)]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing tools; install the Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", *missing], env=env).returncode:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=True)


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def listening(port: int) -> bool:
    """
    Whether something listens on C{port} of IPv4 loopback, checked without
    connecting: iperf3 takes any connection for a test's control channel.
    """
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            return True
    return False


def rss_kib(pid: int) -> int:
    """
    VmRSS of a process and its children (nginx workers, twistd workers).
    """
    total = 0
    for each in [pid, *_children(pid)]:
        try:
            text = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        total += int(match.group(1)) if match else 0
    return total


def cpu_seconds(pids: list[int]) -> float:
    """
    User plus system CPU time used so far by C{pids} and their children.
    """
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """
    User and system CPU time used so far by C{pids} and their children.
    """
    user = system = 0
    for pid in pids:
        for each in [pid, *_children(pid)]:
            try:
                fields = (
                    Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
                )
            except OSError:
                continue
            user += int(fields[11])
            system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = entry.read_text().split()
        except OSError:  # a thread (stunnel has one per connection) ended
            continue
        for child in children:
            found += [int(child), *_children(int(child))]
    return found


def established_to(port: int) -> int:
    """
    Established TCP connections whose local port is C{port} (IPv4 loopback).
    """
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            count += 1
    return count


class Bench:
    """
    The processes under measurement and the measurements themselves.
    """

    def __init__(self, tmp: Path, args) -> None:
        self.tmp = tmp
        self.args = args
        self.procs: list[subprocess.Popen] = []
        self.bin = Path(sys.executable).parent

    # Processes.

    def spawn(self, argv: list[str], log: str, **kwargs) -> subprocess.Popen:
        out = open(self.tmp / log, "ab")
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp, **kwargs
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)

    def twistd(self, *arguments: str, log: str) -> subprocess.Popen:
        argv = [str(self.bin / "twistd"), "-n", "--pidfile=", "ghosttwist", *arguments]
        return self.spawn(argv, log)

    def wait_log(self, log: str, text: str, proc: subprocess.Popen) -> None:
        path = self.tmp / log

        def seen() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{log} exited:\n{path.read_text()[-2000:]}")
            return path.exists() and text in path.read_text()

        wait_for(seen, f"{text!r} in {log}")

    # Backends and identities.

    def start_backends(self) -> None:
        self.iperf_port = free_port()
        self.spawn(
            ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port)],
            "iperf3.log",
        )
        self.nginx_port = free_port()
        root = self.tmp / "www"
        root.mkdir()
        (root / "index.html").write_text("<p>" + "x" * 600 + "</p>\n")
        os.chmod(self.tmp, 0o755)
        os.chmod(root, 0o755)
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            f"""
daemon off;
worker_processes 1;
pid {self.tmp}/nginx.pid;
error_log {self.tmp}/nginx-error.log warn;
worker_rlimit_nofile {self.args.idle * 2 + 256};
events {{ worker_connections {self.args.idle * 2 + 256}; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    server {{
        listen 127.0.0.1:{self.nginx_port};
        root {root};
    }}
}}
"""
        )
        self.spawn(
            [
                _which("nginx"),
                "-c",
                str(conf),
                "-p",
                str(self.tmp),
                "-e",
                str(self.tmp / "nginx-error.log"),
            ],
            "nginx.log",
        )
        for port in (self.iperf_port, self.nginx_port):
            wait_for(lambda: listening(port), f"backend on {port}")

    def start_agent(self) -> None:
        self.sockets = {n: self.tmp / f"{n}.sock" for n in ("backend", "frontend")}
        arguments = ["dev-agent", "--trust-domain", TRUST_DOMAIN]
        for name, path in self.sockets.items():
            arguments += ["--workload", f"{path}=spiffe://{TRUST_DOMAIN}/{name}"]
        self.twistd(*arguments, log="agent.log")
        for path in self.sockets.values():
            wait_for(path.exists, f"socket {path}")

    def mint_files(self) -> None:
        """
        ECDSA P-256 CA, server and client certificates with SPIFFE URI SANs,
        as files for stunnel.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)

        def make(subject, issuer_key, issuer_name, uri, ca):
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
            builder = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(issuer_name or name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=2))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
            )
            if uri:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                    False,
                ).add_extension(
                    x509.ExtendedKeyUsage(
                        [
                            ExtendedKeyUsageOID.SERVER_AUTH,
                            ExtendedKeyUsageOID.CLIENT_AUTH,
                        ]
                    ),
                    False,
                )
            cert = builder.sign(issuer_key or key, hashes.SHA256())
            return cert, key

        def pem(cert, key, stem):
            (self.tmp / f"{stem}.pem").write_bytes(
                cert.public_bytes(serialization.Encoding.PEM)
            )
            if key is not None:
                (self.tmp / f"{stem}-key.pem").write_bytes(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )

        ca, ca_key = make("bench CA", None, None, f"spiffe://{TRUST_DOMAIN}", True)
        pem(ca, None, "ca")
        for stem, uri in (("server", SERVER_ID), ("client", CLIENT_ID)):
            cert, key = make(stem, ca_key, ca.subject, uri, False)
            pem(cert, key, stem)

    # Paths under test: each returns (entry port for iperf3, for nginx, pids).

    def start_direct(self):
        return self.iperf_port, self.nginx_port, []

    def start_stunnel(self):
        ports = {}
        pids = []
        for backend in ("iperf", "nginx"):
            server_port, client_port = free_port(), free_port()
            target = self.iperf_port if backend == "iperf" else self.nginx_port
            for role, accept, connect, stem in (
                ("server", server_port, target, "server"),
                ("client", client_port, server_port, "client"),
            ):
                conf = self.tmp / f"stunnel-{backend}-{role}.conf"
                conf.write_text(
                    f"""
foreground = yes
pid =
syslog = no
debug = 4
[{role}]
client = {"yes" if role == "client" else "no"}
accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
cert = {self.tmp}/{stem}.pem
key = {self.tmp}/{stem}-key.pem
CAfile = {self.tmp}/ca.pem
verifyChain = yes
requireCert = yes
"""
                )
                proc = self.spawn(
                    [_which("stunnel4"), str(conf)], f"stunnel-{backend}-{role}.log"
                )
                pids.append(proc.pid)
            wait_for(lambda: listening(client_port), "stunnel")
            ports[backend] = client_port
        return ports["iperf"], ports["nginx"], pids

    def start_ghosttwist(self, *extra: str):
        ports = {}
        pids = []
        for backend in ("iperf", "nginx"):
            server_port, client_port = free_port(), free_port()
            target = self.iperf_port if backend == "iperf" else self.nginx_port
            server_log, client_log = (
                f"gt-{backend}-server.log",
                f"gt-{backend}-client.log",
            )
            server = self.twistd(
                "server",
                "--listen",
                f"127.0.0.1:{server_port}",
                "--target",
                f"127.0.0.1:{target}",
                "--use-workload-api-addr",
                f"unix://{self.sockets['backend']}",
                "--allow-uri",
                CLIENT_ID,
                *extra,
                log=server_log,
            )
            client = self.twistd(
                "client",
                "--listen",
                f"127.0.0.1:{client_port}",
                "--target",
                f"127.0.0.1:{server_port}",
                "--use-workload-api-addr",
                f"unix://{self.sockets['frontend']}",
                "--verify-uri",
                SERVER_ID,
                *extra,
                log=client_log,
            )
            self.wait_log(server_log, "listening on", server)
            self.wait_log(client_log, "listening on", client)
            pids += [server.pid, client.pid]
            ports[backend] = client_port
        return ports["iperf"], ports["nginx"], pids

    # Measurements.

    def iperf(self, port: int) -> float:
        out = subprocess.run(
            [
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                str(self.args.seconds),
                "-J",
            ],
            capture_output=True,
            text=True,
            timeout=self.args.seconds + 60,
        )
        data = json.loads(out.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        received = data["end"]["sum_received"]
        self.units = received["bytes"] / 1e6
        return received["bits_per_second"] / 8 / 1e6

    def wrk(self, port: int, close: bool) -> dict[str, float]:
        argv = [
            "wrk",
            "-t",
            str(self.args.threads),
            "-c",
            str(self.args.connections),
            "-d",
            f"{self.args.seconds}s",
            "--latency",
        ]
        if close:
            argv += ["-H", "Connection: close"]
        out = subprocess.run(
            [*argv, f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=self.args.seconds + 60,
        ).stdout
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        self.units = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Socket errors: (.*)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx or (errors and not close):
            print(f"  wrk reported problems: {out}", file=sys.stderr)
        return {
            "rate": rate,
            "p50": _percentile(out, "50"),
            "p99": _percentile(out, "99"),
        }

    def memory(self, port: int, pids: list[int]) -> float | None:
        """
        KiB of RSS per idle connection pair, over all tunnel processes.
        """
        if not pids:
            return None
        # Warm up: a few connections opened and closed first.
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while sock.recv(65536):
                    pass
        base_backend = established_to(self.nginx_port)
        before = sum(rss_kib(pid) for pid in pids)
        sockets = []
        try:
            for _ in range(self.args.idle):
                sockets.append(socket.create_connection(("127.0.0.1", port)))
                if len(sockets) % 100 == 0:
                    wanted = base_backend + len(sockets)
                    wait_for(
                        lambda: established_to(self.nginx_port) >= wanted,
                        "idle connections to reach nginx",
                        60,
                    )
            wanted = base_backend + len(sockets)
            wait_for(
                lambda: established_to(self.nginx_port) >= wanted,
                "idle connections to reach nginx",
                60,
            )
            time.sleep(0.5)  # let allocator settle; a measurement, not a sync
            after = sum(rss_kib(pid) for pid in pids)
        finally:
            for sock in sockets:
                sock.close()
        wait_for(
            lambda: established_to(self.nginx_port) <= base_backend + 5,
            "idle connections to close",
            60,
        )
        return (after - before) / len(sockets)

    def profile(self, pids: list[int], name: str):
        if not self.args.profile:
            return []
        spy = shutil.which("py-spy") or str(self.bin / "py-spy")
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        return [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    str(self.args.seconds),
                    "-f",
                    "raw",
                    "-o",
                    str(out / f"{name}-{pid}.txt"),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid in pids
        ]

    def measure(self, name: str, start, round_number: int) -> dict:
        """
        Start one path, put each load through it, and stop nothing.
        """
        iperf_port, nginx_port, pids = start()
        for port in (iperf_port, nginx_port):
            wait_for(lambda: listening(port), f"{name} on port {port}")
        cpu = {}
        kernel = {}

        def load(kind, run, *args):
            spies = self.profile(pids, f"{name}-{kind}-r{round_number}")
            user, system = cpu_split(pids)
            result = run(*args)
            # CPU the tunnels spent per unit of work (MB, request): unlike
            # rates, barely moved by whatever else the machine is doing.
            user_after, system_after = cpu_split(pids)
            used = user_after - user + system_after - system
            cpu[kind] = used * 1e6 / max(self.units, 1)
            kernel[kind] = (system_after - system) / used if used else 0.0
            [spy.wait() for spy in spies]
            return result

        bulk = load("bulk", self.iperf, iperf_port)
        keepalive = load("keepalive", self.wrk, nginx_port, False)
        close = load("close", self.wrk, nginx_port, True)
        # pids come in (iperf pair, nginx pair) order: the nginx pair last.
        memory = self.memory(nginx_port, pids[len(pids) // 2 :])
        return {
            "bulk": bulk,
            "keepalive": keepalive,
            "close": close,
            "memory": memory,
            "cpu_us": cpu,
            "kernel_share": kernel,
        }

    def show_logs(self) -> None:
        for path in sorted(self.tmp.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-5:]
            print(f"  --- {path.name}", *tail, sep="\n    ", file=sys.stderr)

    def run(self) -> dict:
        self.start_backends()
        self.start_agent()
        self.mint_files()
        paths = {
            "direct": self.start_direct,
            "stunnel": self.start_stunnel,
            "ghosttwist": self.start_ghosttwist,
        }
        if _has_workers():
            paths["ghosttwist --workers 2"] = lambda: self.start_ghosttwist(
                "--workers", "2"
            )
        if self.args.paths:
            keep = set(self.args.paths.split(","))
            paths = {k: v for k, v in paths.items() if k in keep or k == "direct"}

        results = {name: [] for name in paths}
        for round_number in range(self.args.rounds):
            for name, start in paths.items():
                print(f"round {round_number + 1}: {name}", file=sys.stderr)
                for attempt in range(2):
                    before = list(self.procs)
                    try:
                        results[name].append(self.measure(name, start, round_number))
                        break
                    except (RuntimeError, subprocess.TimeoutExpired) as error:
                        print(f"  failed ({error}); logs:", file=sys.stderr)
                        self.show_logs()
                        if attempt:
                            raise
                    finally:
                        for proc in [p for p in self.procs if p not in before]:
                            self.stop(proc)
                print(f"  {json.dumps(results[name][-1])}", file=sys.stderr)
        return results


def _has_workers() -> bool:
    try:
        from ghosttwist.options import ServerOptions
    except ImportError:
        return False
    return "workers" in ServerOptions()


def _percentile(out: str, which: str) -> float:
    match = re.search(rf"^\s+{which}%\s+(\S+)", out, re.MULTILINE)
    if match is None:
        print(f"  no {which}th percentile in wrk's output:\n{out}", file=sys.stderr)
        return float("nan")
    return _ms(match.group(1))


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def _spread(values: list[float], fmt: str) -> str:
    values = sorted(values)
    middle = statistics.median(values)
    if len(values) == 1:
        return format(middle, fmt)
    return f"{middle:{fmt}} ({values[0]:{fmt}}-{values[-1]:{fmt}})"


def render(results: dict, args) -> str:
    direct = results["direct"]
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    rounds = f"{args.rounds} round{'' if args.rounds == 1 else 's'}"
    lines = [
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python "
        f"{platform.python_version()}; {rounds} of {args.seconds} s per "
        f"load, wrk -t{args.threads} -c{args.connections}, {args.idle} idle "
        "connections. Each cell: median (min-max) over rounds; ratios are to the "
        "direct path of the same round.",
        "",
        "| path | bulk | keep-alive req/s | keep-alive p50 / p99 ms | new conns/s "
        "| KiB per idle pair |",
        "|---|---|---|---|---|---|",
    ]
    d_bulk = [r["bulk"] for r in direct]
    d_keep = [r["keepalive"]["rate"] for r in direct]
    d_close = [r["close"]["rate"] for r in direct]
    lines.append(
        f"| direct (absolute) | {_spread(d_bulk, '.0f')} MB/s | "
        f"{_spread(d_keep, '.0f')} | {_spread([r['keepalive']['p50'] for r in direct], '.2f')}"
        f" / {_spread([r['keepalive']['p99'] for r in direct], '.2f')} | "
        f"{_spread(d_close, '.0f')} | - |"
    )
    for name, runs in results.items():
        if name == "direct":
            continue
        bulk = [r["bulk"] / d for r, d in zip(runs, d_bulk)]
        keep = [r["keepalive"]["rate"] / d for r, d in zip(runs, d_keep)]
        close = [r["close"]["rate"] / d for r, d in zip(runs, d_close)]
        p50 = [r["keepalive"]["p50"] for r in runs]
        p99 = [r["keepalive"]["p99"] for r in runs]
        memory = [r["memory"] for r in runs if r["memory"] is not None]
        lines.append(
            f"| {name} | {_spread(bulk, '.3f')} | {_spread(keep, '.3f')} | "
            f"{_spread(p50, '.2f')} / {_spread(p99, '.2f')} | {_spread(close, '.3f')} | "
            f"{_spread(memory, '.0f') if memory else '-'} |"
        )
    lines.append(
        f"| ghostunnel 1.7.1 (quoted in issue 7, not run here) | {GHOSTUNNEL['bulk']} | "
        f"{GHOSTUNNEL['keepalive']} | - / {GHOSTUNNEL['p99']} | {GHOSTUNNEL['close']} | "
        f"{GHOSTUNNEL['memory']} |"
    )
    lines.append(
        f"| target | >= {TARGETS['bulk']} | >= {TARGETS['keepalive']} | - / <= "
        f"{TARGETS['p99']} | >= {TARGETS['close']} | <= {TARGETS['memory']} |"
    )
    lines += [
        "",
        "Absolute figures of the tunnels, and the CPU time both tunnel processes "
        "spent per unit of work (median over rounds; CPU per unit hardly depends "
        "on what else the machine runs):",
        "",
    ]
    for name, runs in results.items():
        if name == "direct":
            continue

        def cpu(kind, unit, runs=runs):
            used = statistics.median(r["cpu_us"][kind] for r in runs)
            kernel = statistics.median(
                r.get("kernel_share", {}).get(kind, 0) for r in runs
            )
            return f"{used:.0f} CPU us per {unit}, {kernel:.0%} of it in the kernel"

        lines.append(
            f"- {name}: {statistics.median(r['bulk'] for r in runs):.0f} MB/s "
            f"({cpu('bulk', 'MB')}), "
            f"{statistics.median(r['keepalive']['rate'] for r in runs):.0f} req/s "
            f"keep-alive ({cpu('keepalive', 'request')}), "
            f"{statistics.median(r['close']['rate'] for r in runs):.0f} "
            f"new connections/s ({cpu('close', 'connection')})"
        )
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
