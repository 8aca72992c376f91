"""
The operator's network surface, end to end: systemd socket activation,
unix listeners, SO_REUSEPORT, safety rails, connection limits, PROXY
protocol v2 headers, outbound proxies and log controls. Real twistd
processes, real sockets and real TLS on loopback.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import urllib.request

import pytest
from twisted.protocols.haproxy._v2parser import V2Parser

from tests.processes import (
    REPOSITORY,
    Process,
    environment,
    free_port,
    recv_all,
    svid_files,
    tls_client,
    tls_connect,
    twistd,
    wait_for,
)

ALLOW_FRONTEND = ("--allow-uri", "spiffe://domain.test/frontend")


def _server(agent, tmp_path, processes, listen, target, *flags, name="server"):
    process = Process(
        twistd(
            "server",
            "--listen",
            listen,
            "--target",
            target,
            "--use-workload-api-addr",
            agent.address("backend"),
            *flags,
        ),
        tmp_path / f"{name}.log",
    )
    processes.append(process)
    return process


def _frontend(agent, tmp_path) -> ssl.SSLContext:
    files = svid_files(agent, "frontend", tmp_path)
    return tls_client(files, files["ca"])


def _echo_once(connection: ssl.SSLSocket, payload: bytes) -> bytes:
    connection.sendall(payload)
    return recv_all(connection, len(payload))


def _closed(connection: socket.socket) -> bool:
    """
    Whether the peer has closed: EOF or a reset, read within the deadline.
    """
    connection.settimeout(30)
    try:
        return connection.recv(100) == b""
    except (ConnectionError, ssl.SSLError):
        return True


# Listeners.


def test_systemd_socket_activation(tmp_path, agent, backend, processes):
    """
    The tunnel listens on sockets it inherits as fds 3 and 4, named by
    LISTEN_FDNAMES, with LISTEN_PID equal to its own pid, as systemd passes
    them: --listen systemd:tunnel serves the tunnel and --status
    systemd:status the status page.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    status = socket.create_server(("127.0.0.1", 0))
    port, status_port = listener.getsockname()[1], status.getsockname()[1]
    wrapper = (
        "import os, sys; "
        "fds = [os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2]))]; "
        "os.dup2(fds[0], 3); os.dup2(fds[1], 4); "
        "[os.set_inheritable(fd, True) for fd in (3, 4)]; "
        "os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    arguments = [
        sys.executable,
        "-c",
        wrapper,
        str(listener.fileno()),
        str(status.fileno()),
        *twistd(
            "server",
            "--listen",
            "systemd:tunnel",
            "--target",
            backend.address,
            "--status",
            "systemd:status",
            "--use-workload-api-addr",
            agent.address("backend"),
            *ALLOW_FRONTEND,
        ),
    ]
    env = environment(LISTEN_FDS="2", LISTEN_FDNAMES="tunnel:status")
    with open(tmp_path / "systemd.log", "wb") as log_file:
        child = subprocess.Popen(
            arguments,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(listener.fileno(), status.fileno()),
            cwd=tmp_path,
        )
        listener.close()
        status.close()
        try:
            wait_for(
                lambda: (
                    "listening on" in (tmp_path / "systemd.log").read_text()
                    or child.poll() is not None
                ),
                "the tunnel to listen",
            )
            assert child.poll() is None, (tmp_path / "systemd.log").read_text()

            with tls_connect(port, _frontend(agent, tmp_path)) as connection:
                assert _echo_once(connection, b"activated") == b"activated"

            url = f"http://127.0.0.1:{status_port}/_status"
            with urllib.request.urlopen(url, timeout=15) as answer:
                assert answer.status == 200
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(30)


def test_systemd_name_not_passed_is_one_line_and_exit_1(tmp_path, agent, processes):
    """
    systemd:NAME without such a socket passed in fails at start-up in one
    line naming it.
    """
    server = _server(
        agent, tmp_path, processes, "systemd:missing", "127.0.0.1:9", *ALLOW_FRONTEND
    )

    assert server.wait(30) == 1
    assert "systemd passed no socket named 'missing'" in server.log
    assert "Traceback" not in server.log


def _unix_tls(path, context) -> ssl.SSLSocket:
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(15)
    raw.connect(str(path))
    return context.wrap_socket(raw)


def test_unix_listener_replaces_stale_socket_and_removes_its_own(
    tmp_path, agent, backend, processes
):
    """
    A socket file nobody answers on is taken over; the tunnel's own socket
    file is gone after it stops.
    """
    path = tmp_path / "tunnel.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert path.exists()

    server = _server(
        agent, tmp_path, processes, f"unix:{path}", backend.address, *ALLOW_FRONTEND
    )
    server.wait_for_log("listening on")
    assert "removed stale socket" in server.log

    with _unix_tls(path, _frontend(agent, tmp_path)) as connection:
        assert _echo_once(connection, b"over unix") == b"over unix"

    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert not path.exists()


def test_unix_listener_leaves_a_live_socket_alone(tmp_path, agent, processes):
    """
    A socket another process listens on is not removed: the tunnel fails
    to start, in one line.
    """
    path = tmp_path / "busy.sock"
    busy = socket.socket(socket.AF_UNIX)
    busy.bind(str(path))
    busy.listen()
    try:
        server = _server(
            agent, tmp_path, processes, f"unix:{path}", "127.0.0.1:9", *ALLOW_FRONTEND
        )
        assert server.wait(30) == 1
        assert "another process is listening on it" in server.log
        assert path.exists()
    finally:
        busy.close()


def test_two_servers_share_a_port_with_reuseport(tmp_path, agent, backend, processes):
    """
    A second tunnel binds the port the first listens on; once the first
    stops, the second serves every new connection.
    """
    port = free_port()
    listen = f"127.0.0.1:{port}"
    first = _server(
        agent,
        tmp_path,
        processes,
        listen,
        backend.address,
        *ALLOW_FRONTEND,
        name="first",
    )
    first.wait_for_log("listening on")
    second = _server(
        agent,
        tmp_path,
        processes,
        listen,
        backend.address,
        *ALLOW_FRONTEND,
        name="second",
    )
    second.wait_for_log("listening on")

    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0

    context = _frontend(agent, tmp_path)
    for number in range(3):
        with tls_connect(port, context) as connection:
            assert _echo_once(connection, b"hand-over") == b"hand-over"
    assert second.log.count("client spiffe://domain.test/frontend allowed") == 3


# Safety rails.


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            [
                "server",
                "--listen",
                "127.0.0.1:1",
                "--target",
                "192.0.2.1:80",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--allow-all",
            ],
            "--unsafe-target",
        ),
        (
            [
                "client",
                "--listen",
                "0.0.0.0:1",
                "--target",
                "127.0.0.1:2",
                "--use-workload-api-addr",
                "unix:///x.sock",
            ],
            "--unsafe-listen",
        ),
        (
            [
                "server",
                "--listen",
                "127.0.0.1:1",
                "--target",
                "unix:/x",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--allow-all",
                "--proxy-protocol",
                "--proxy-protocol-mode",
                "tls",
            ],
            "exclude each other",
        ),
        (
            [
                "server",
                "--listen",
                "127.0.0.1:1",
                "--target",
                "unix:/x",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--allow-all",
                "--proxy-protocol-mode",
                "full",
            ],
            "choose conn, tls or tls-full",
        ),
        (
            [
                "client",
                "--listen",
                "127.0.0.1:1",
                "--target",
                "127.0.0.1:2",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--proxy",
                "ftp://h:1",
            ],
            "http://HOST:PORT or socks5://HOST:PORT",
        ),
        (
            [
                "server",
                "--listen",
                "127.0.0.1:1",
                "--target",
                "127.0.0.1:2",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--allow-all",
                "--max-concurrent-conns",
                "-1",
            ],
            "--max-concurrent-conns",
        ),
        (
            [
                "server",
                "--listen",
                "127.0.0.1:1",
                "--target",
                "127.0.0.1:2",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--allow-all",
                "--quiet",
                "everything",
            ],
            "--quiet",
        ),
        (
            [
                "server",
                "--listen",
                "127.0.0.1:1",
                "--target",
                "systemd:x",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--allow-all",
            ],
            "can only be listened on",
        ),
        # A label longer than 63 bytes fails before any resolver is asked.
        (
            [
                "server",
                "--listen",
                "127.0.0.1:1",
                "--target",
                "a" * 64 + ".test:80",
                "--unsafe-target",
                "--use-workload-api-addr",
                "unix:///x.sock",
                "--allow-all",
            ],
            "--skip-resolve",
        ),
    ],
    ids=[
        "remote-target",
        "public-listen",
        "both-proxy-flags",
        "bad-proxy-mode",
        "bad-proxy-url",
        "negative-limit",
        "bad-quiet",
        "systemd-target",
        "unresolvable-target",
    ],
)
def test_network_mistakes_are_one_line_and_exit_2(arguments, message):
    """
    Each mistake ends in one line on stderr and exit status 2.
    """
    result = subprocess.run(
        twistd(*arguments),
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
        check=False,
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_skip_resolve_starts_with_a_name_that_does_not_resolve(
    tmp_path, agent, processes
):
    """
    With --skip-resolve the same unresolvable target is accepted at
    start-up and only fails per connection.
    """
    port = free_port()
    server = _server(
        agent,
        tmp_path,
        processes,
        f"127.0.0.1:{port}",
        "a" * 64 + ".test:80",
        "--unsafe-target",
        "--skip-resolve",
        *ALLOW_FRONTEND,
    )
    server.wait_for_log("listening on")

    with tls_connect(port, _frontend(agent, tmp_path)) as connection:
        assert _closed(connection)
    server.wait_for_log("cannot reach")


# Failures and limits.


def test_target_that_flaps_fails_per_connection_then_recovers(
    tmp_path, agent, processes
):
    """
    While the target is down each connection is closed with one log line;
    once it is up, new connections go through.
    """
    target_port = free_port()
    port = free_port()
    server = _server(
        agent,
        tmp_path,
        processes,
        f"127.0.0.1:{port}",
        f"127.0.0.1:{target_port}",
        *ALLOW_FRONTEND,
    )
    server.wait_for_log("listening on")
    context = _frontend(agent, tmp_path)

    with tls_connect(port, context) as connection:
        assert _closed(connection)
    server.wait_for_log("cannot reach")

    target = socket.create_server(("127.0.0.1", target_port))
    try:
        with tls_connect(port, context) as connection:
            connection.sendall(b"up again")
            accepted, _ = target.accept()
            with accepted:
                accepted.settimeout(15)
                assert recv_all(accepted, 8) == b"up again"
    finally:
        target.close()


def test_silent_peer_is_dropped_at_connect_timeout_while_others_are_served(
    tmp_path, agent, backend, processes
):
    """
    A peer that connects and sends nothing is dropped after
    --connect-timeout; a client arriving meanwhile is served.
    """
    port = free_port()
    server = _server(
        agent,
        tmp_path,
        processes,
        f"127.0.0.1:{port}",
        backend.address,
        "--connect-timeout",
        "2s",
        *ALLOW_FRONTEND,
    )
    server.wait_for_log("listening on")

    silent = socket.create_connection(("127.0.0.1", port), timeout=30)
    with tls_connect(port, _frontend(agent, tmp_path)) as connection:
        assert _echo_once(connection, b"served") == b"served"

    assert _closed(silent)
    silent.close()
    assert "timed out during TLS handshake" in server.wait_for_log("timed out")


def test_connection_past_the_limit_waits_for_a_free_slot(
    tmp_path, agent, backend, processes
):
    """
    With --max-concurrent-conns 2 a third connection is not refused: it
    waits, and proceeds once one of the first two closes.
    """
    port = free_port()
    server = _server(
        agent,
        tmp_path,
        processes,
        f"127.0.0.1:{port}",
        backend.address,
        "--max-concurrent-conns",
        "2",
        *ALLOW_FRONTEND,
    )
    server.wait_for_log("listening on")
    context = _frontend(agent, tmp_path)

    first = tls_connect(port, context)
    second = tls_connect(port, context)
    assert _echo_once(first, b"one") == b"one"
    assert _echo_once(second, b"two") == b"two"
    server.wait_for_log("2 connections open: new connections wait")

    result = {}

    def third() -> None:
        with tls_connect(port, context, timeout=60) as connection:
            result["echo"] = _echo_once(connection, b"three")

    waiter = threading.Thread(target=third, daemon=True)
    waiter.start()
    wait_for(lambda: backend.accepted == 2 and waiter.is_alive(), "the third to wait")

    first.close()
    waiter.join(60)
    second.close()

    assert result.get("echo") == b"three"
    assert backend.accepted == 3


def test_connection_is_closed_at_max_conn_lifetime(tmp_path, agent, backend, processes):
    """
    A connection that is still open at --max-conn-lifetime is closed.
    """
    port = free_port()
    server = _server(
        agent,
        tmp_path,
        processes,
        f"127.0.0.1:{port}",
        backend.address,
        "--max-conn-lifetime",
        "1s",
        *ALLOW_FRONTEND,
    )
    server.wait_for_log("listening on")

    with tls_connect(port, _frontend(agent, tmp_path)) as connection:
        assert _echo_once(connection, b"still here") == b"still here"
        assert _closed(connection)
    server.wait_for_log("--max-conn-lifetime 1.0s reached")


def test_accepts_recover_after_running_out_of_descriptors(
    tmp_path, agent, backend, processes
):
    """
    With a low RLIMIT_NOFILE, connections past what the descriptors allow
    fail, the listener survives, and once descriptors are free again new
    connections are served.
    """
    port = free_port()
    wrapper = (
        "import os, resource, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (80, 80)); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    server = Process(
        [
            sys.executable,
            "-c",
            wrapper,
            *twistd(
                "server",
                "--listen",
                f"127.0.0.1:{port}",
                "--target",
                backend.address,
                "--use-workload-api-addr",
                agent.address("backend"),
                *ALLOW_FRONTEND,
            ),
        ],
        tmp_path / "emfile.log",
    )
    processes.append(server)
    server.wait_for_log("listening on")
    context = _frontend(agent, tmp_path)

    held = []
    failed = False
    try:
        for _ in range(80):
            try:
                connection = tls_connect(port, context, timeout=15)
                held.append(connection)
                if _echo_once(connection, b"x") != b"x":
                    failed = True
                    break
            except (OSError, ssl.SSLError):
                failed = True
                break
        assert failed, "80 connections never ran out of descriptors"
    finally:
        for connection in held:
            connection.close()

    def served() -> bool:
        try:
            with tls_connect(port, context, timeout=5) as connection:
                return _echo_once(connection, b"again") == b"again"
        except (OSError, ssl.SSLError):
            return False

    wait_for(served, "a connection served after descriptors were freed")
    assert server.process.poll() is None
    assert "EMFILE encountered" in server.log


# PROXY protocol v2.


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def _read_proxy_header(connection: socket.socket) -> bytes:
    head = _read_exactly(connection, 16)
    (length,) = struct.unpack("!H", head[14:16])
    return head + _read_exactly(connection, length)


def _tlvs(data: bytes) -> dict[int, bytes]:
    found = {}
    while data:
        kind, length = struct.unpack("!BH", data[:3])
        found[kind] = data[3 : 3 + length]
        data = data[3 + length :]
    return found


def test_proxy_protocol_header_reaches_the_target(tmp_path, agent, processes):
    """
    With --proxy-protocol-mode tls-full the target first reads a PROXY v2
    header that Twisted's parser accepts, with the client's address, the
    tunnel's address, the TLS details, and the client's SPIFFE ID in TLV
    0xE0; the client's bytes follow.
    """
    target = socket.create_server(("127.0.0.1", 0))
    target_port = target.getsockname()[1]
    port = free_port()
    server = _server(
        agent,
        tmp_path,
        processes,
        f"127.0.0.1:{port}",
        f"127.0.0.1:{target_port}",
        "--proxy-protocol-mode",
        "tls-full",
        *ALLOW_FRONTEND,
    )
    server.wait_for_log("listening on")

    try:
        with tls_connect(port, _frontend(agent, tmp_path)) as connection:
            connection.sendall(b"payload")
            accepted, _ = target.accept()
            with accepted:
                accepted.settimeout(15)
                raw = _read_proxy_header(accepted)
                payload = _read_exactly(accepted, 7)
            client_port = connection.getsockname()[1]
    finally:
        target.close()

    info = V2Parser.parse(raw)
    assert (info.source.host, info.source.port) == ("127.0.0.1", client_port)
    assert (info.destination.host, info.destination.port) == ("127.0.0.1", port)
    assert payload == b"payload"

    tlvs = _tlvs(raw[16 + 12 :])
    assert tlvs[0xE0] == b"spiffe://domain.test/frontend"
    ssl_tlv = tlvs[0x20]
    assert ssl_tlv[0] & 0x07 == 0x07
    assert struct.unpack("!I", ssl_tlv[1:5]) == (0,)
    subs = _tlvs(ssl_tlv[5:])
    assert subs[0x21].startswith(b"TLSv1.")
    assert subs[0x28][:1] == b"\x30"


def test_proxy_protocol_over_ipv6(tmp_path, agent, processes):
    """
    A client on [::1] is described with the IPv6 family.
    """
    target = socket.create_server(("127.0.0.1", 0))
    target_port = target.getsockname()[1]
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    server = _server(
        agent,
        tmp_path,
        processes,
        f"[::1]:{port}",
        f"127.0.0.1:{target_port}",
        "--proxy-protocol",
        *ALLOW_FRONTEND,
    )
    server.wait_for_log("listening on")

    try:
        raw_client = socket.create_connection(("::1", port), timeout=15)
        with _frontend(agent, tmp_path).wrap_socket(raw_client) as connection:
            connection.sendall(b"v6")
            accepted, _ = target.accept()
            with accepted:
                accepted.settimeout(15)
                raw = _read_proxy_header(accepted)
            client_port = connection.getsockname()[1]
    finally:
        target.close()

    info = V2Parser.parse(raw)
    loopback = ipaddress.IPv6Address("::1")
    assert (ipaddress.IPv6Address(info.source.host), info.source.port) == (
        loopback,
        client_port,
    )
    assert (ipaddress.IPv6Address(info.destination.host), info.destination.port) == (
        loopback,
        port,
    )
    assert _tlvs(raw[16 + 36 :]) == {0xE0: b"spiffe://domain.test/frontend"}


# Outbound proxies.


def _proxy(kind: str, tmp_path, processes, credentials: str = "") -> int:
    port = free_port()
    process = Process(
        [sys.executable, "-m", "tests.proxies", kind, str(port), credentials],
        tmp_path / f"{kind}-proxy.log",
        env=environment(PYTHONPATH=str(REPOSITORY)),
    )
    processes.append(process)
    process.wait_for_log("proxy listening")
    return port


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_client_reaches_the_server_through_an_outbound_proxy(
    kind, tmp_path, agent, backend, processes
):
    """
    The client tunnel opens its connections through a CONNECT or SOCKS5
    proxy that wants a user and password; bytes go through end to end.
    """
    proxy_port = _proxy(kind, tmp_path, processes, "ghost:s3cret")
    server_port = free_port()
    server = _server(
        agent,
        tmp_path,
        processes,
        f"127.0.0.1:{server_port}",
        backend.address,
        *ALLOW_FRONTEND,
    )
    server.wait_for_log("listening on")
    port = free_port()
    client = Process(
        twistd(
            "client",
            "--listen",
            f"127.0.0.1:{port}",
            "--target",
            f"localhost:{server_port}",
            "--use-workload-api-addr",
            agent.address("frontend"),
            "--verify-uri",
            "spiffe://domain.test/backend",
            "--proxy",
            f"{kind}://ghost:s3cret@127.0.0.1:{proxy_port}",
        ),
        tmp_path / "client.log",
    )
    processes.append(client)
    client.wait_for_log("listening on")

    with socket.create_connection(("127.0.0.1", port), timeout=15) as connection:
        connection.sendall(b"through the proxy")
        assert recv_all(connection, 17) == b"through the proxy"

    proxy_log = (tmp_path / f"{kind}-proxy.log").read_text()
    assert f"tunnel to 127.0.0.1:{server_port}" in proxy_log
    assert "s3cret" not in client.log


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_proxy_refusal_fails_that_connection_only(kind, tmp_path, agent, processes):
    """
    A proxy that refuses the credentials closes the plain client's
    connection, with one log line naming the proxy's answer.
    """
    proxy_port = _proxy(kind, tmp_path, processes, "ghost:right")
    port = free_port()
    client = Process(
        twistd(
            "client",
            "--listen",
            f"127.0.0.1:{port}",
            "--target",
            "127.0.0.1:9",
            "--use-workload-api-addr",
            agent.address("frontend"),
            "--proxy",
            f"{kind}://ghost:wrong@127.0.0.1:{proxy_port}",
        ),
        tmp_path / "client.log",
    )
    processes.append(client)
    client.wait_for_log("listening on")

    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=15) as connection:
            connection.sendall(b"hello")
            assert _closed(connection)

    log = client.wait_for_log("cannot reach", count=2)
    assert "wrong" not in log
    assert client.process.poll() is None


# Logging.


def test_quiet_conns_and_logfile(tmp_path, agent, backend, processes):
    """
    With --quiet conns no per-connection line is written, refusals still
    are, and twistd's --logfile receives the log.
    """
    port = free_port()
    log_path = tmp_path / "tunnel-file.log"
    server = Process(
        [
            os.path.join(os.path.dirname(sys.executable), "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={log_path}",
            "ghosttwist",
            "server",
            "--listen",
            f"127.0.0.1:{port}",
            "--target",
            backend.address,
            "--use-workload-api-addr",
            agent.address("backend"),
            "--quiet",
            "conns",
            *ALLOW_FRONTEND,
        ],
        tmp_path / "quiet-stdout.log",
    )
    processes.append(server)
    wait_for(
        lambda: log_path.exists() and "listening on" in log_path.read_text(),
        "the listening line in the --logfile",
    )

    with tls_connect(port, _frontend(agent, tmp_path)) as connection:
        assert _echo_once(connection, b"hush") == b"hush"

    intruder = svid_files(agent, "intruder", tmp_path)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        tls_connect(port, tls_client(intruder, intruder["ca"])) as connection,
    ):
        connection.sendall(b"x")
        connection.recv(10)
    wait_for(lambda: "refused connection" in log_path.read_text(), "the refusal line")

    text = log_path.read_text()
    assert ": client spiffe://domain.test/frontend allowed" not in text
    assert "closed connection" not in text
