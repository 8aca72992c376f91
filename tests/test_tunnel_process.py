"""
The tunnel end to end: real twistd processes, the dev agent as the Workload
API, real sockets and real TLS on loopback.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import threading

import pytest

from tests import certs
from tests.processes import (
    Backend,
    Process,
    free_port,
    peer_serial,
    port_answers,
    recv_all,
    svid_files,
    tls_client,
    tls_connect,
    twistd,
    wait_for,
    write_identity,
    environment,
)


def _connect(tunnel) -> socket.socket:
    return socket.create_connection(("127.0.0.1", tunnel.port), timeout=15)


def _round_trip(tunnel, payload: bytes) -> bytes:
    with _connect(tunnel) as connection:
        connection.sendall(payload)
        return recv_all(connection, len(payload))


def test_http_round_trip_with_curl(tmp_path, agent, start_tunnel):
    """
    curl through the client tunnel reaches an HTTP backend behind the
    server tunnel.
    """
    (tmp_path / "hello.txt").write_text("hello through mutual TLS\n")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    http_port = port.getsockname()[1]
    port.close()
    http = subprocess.Popen(
        ["python3", "-m", "http.server", str(http_port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_answers(http_port), "the HTTP backend")
        server = start_tunnel(
            "server", f"127.0.0.1:{http_port}",
            "--use-workload-api-addr", agent.address("backend"),
            "--allow-uri", "spiffe://domain.test/frontend",
        )
        client = start_tunnel(
            "client", server.address,
            "--use-workload-api-addr", agent.address("frontend"),
            "--verify-uri", "spiffe://domain.test/backend",
        )
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "10", f"http://{client.address}/hello.txt"],
            capture_output=True,
            check=True,
        )
    finally:
        http.terminate()
        http.wait()

    assert result.stdout == b"hello through mutual TLS\n"
    server.wait_for_log("client spiffe://domain.test/frontend allowed")
    client.wait_for_log("server spiffe://domain.test/backend allowed")


def test_one_mebibyte_echo_is_intact(pair):
    """
    A 1 MiB payload comes back through both tunnels byte for byte.
    """
    _, client = pair
    payload = os.urandom(1024 * 1024)

    echoed = _round_trip(client, payload)

    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_environment_variable_names_the_workload_api(agent, backend, tmp_path, processes):
    """
    --use-workload-api takes its address from SPIFFE_ENDPOINT_SOCKET.
    """
    port = free_port()
    server = Process(
        twistd(
            "server", "--listen", f"127.0.0.1:{port}", "--target", backend.address,
            "--use-workload-api", "--allow-uri", "spiffe://domain.test/frontend",
        ),
        tmp_path / "env-server.log",
        env=environment(SPIFFE_ENDPOINT_SOCKET=agent.address("backend")),
    )
    processes.append(server)

    log = server.wait_for_log("listening on")

    assert "identity updated: spiffe://domain.test/backend" in log


def test_unauthorized_spiffe_id_is_refused(tmp_path, agent, backend, start_tunnel):
    """
    A client with a valid SVID whose ID is not allowed fails the handshake
    and never reaches the backend.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-uri", "spiffe://domain.test/frontend",
    )
    intruder = svid_files(agent, "intruder", tmp_path)

    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_connect(server.port, tls_client(intruder, intruder["ca"])) as conn:
            conn.sendall(b"let me in")
            assert conn.recv(100) == b""

    log = server.wait_for_log("refused connection")
    assert "unauthorized" in log
    assert "spiffe://domain.test/intruder" in log
    assert backend.accepted == 0


def test_spiffe_id_from_another_ca_is_refused(tmp_path, agent, backend, start_tunnel):
    """
    A certificate that claims spiffe://domain.test/frontend but was signed by
    a CA outside the bundle is refused during the handshake.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-uri", "spiffe://domain.test/frontend",
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = {
        "not_before": now - datetime.timedelta(hours=1),
        "not_after": now + datetime.timedelta(hours=1),
    }
    rogue_ca = certs.root_ca("Rogue CA", uris=["spiffe://domain.test"], **validity)
    forged = certs.leaf(rogue_ca, "spiffe://domain.test/frontend", **validity)
    real = svid_files(agent, "frontend", tmp_path)
    files = write_identity(tmp_path, "forged", [forged.cert], forged.key, [rogue_ca.cert])

    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_connect(server.port, tls_client(files, real["ca"])) as conn:
            conn.sendall(b"let me in")
            assert conn.recv(100) == b""

    log = server.wait_for_log("refused connection")
    assert "untrusted-chain: issuer not in any trust bundle" in log
    assert "(peer spiffe://domain.test/frontend)" in log
    assert backend.accepted == 0


def test_svid_rotation_keeps_open_connections(tmp_path, agent, pair):
    """
    After SIGUSR1 to the agent, a new connection to the server sees a new
    serial while a connection opened before keeps flowing.
    """
    server, client = pair
    frontend = svid_files(agent, "frontend", tmp_path)
    context = tls_client(frontend, frontend["ca"])
    with tls_connect(server.port, context) as first:
        before = peer_serial(first)
    open_connection = _connect(client)
    open_connection.sendall(b"before rotation")
    assert recv_all(open_connection, 15) == b"before rotation"

    agent.signal(signal.SIGUSR1)
    server.wait_for_log("identity updated", count=2)

    with tls_connect(server.port, context) as second:
        after = peer_serial(second)
    assert after != before
    open_connection.sendall(b"after rotation")
    assert recv_all(open_connection, 14) == b"after rotation"
    open_connection.close()


def test_ca_rotation_keeps_the_tunnel_working(tmp_path, agent, pair):
    """
    After SIGUSR2 the agent publishes a new CA, then signs with it; the
    tunnels follow and new connections through them keep working.
    """
    server, client = pair
    agent.signal(signal.SIGUSR2)

    def signed_by_new_ca():
        context = agent.fetch("backend")
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(
            context.default_svid.spiffe_id.trust_domain
        )
        return len(bundle.x509_authorities) == 2 and context.default_svid.leaf

    wait_for(signed_by_new_ca, "an SVID signed by the new CA")
    server.wait_for_log("bundles=domain.test(2 CA)")
    client.wait_for_log("bundles=domain.test(2 CA)")
    wait_for(lambda: server.log.count("identity updated") >= 3, "the new SVID")

    assert _round_trip(client, b"after CA rotation") == b"after CA rotation"


def test_agent_absent_at_start_times_out(tmp_path, backend, start_tunnel):
    """
    With no agent, start-up fails after --use-workload-api-timeout with one
    line that names the address, and a non-zero exit.
    """
    missing = tmp_path / "missing.sock"
    tunnel = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", f"unix://{missing}",
        "--use-workload-api-timeout", "1s",
        "--allow-all",
        wait=False,
    )

    assert tunnel.wait(30) == 1
    errors = [line for line in tunnel.log.splitlines() if "no X509-SVID" in line]
    assert errors and str(missing) in errors[0]
    assert "Traceback" not in tunnel.log


def test_agent_restart_keeps_identity_then_takes_updates(agent, pair, processes):
    """
    When the agent dies the tunnels keep their last SVID and keep working;
    when it comes back (with a new CA) they take its updates again.
    """
    server, client = pair
    agent.process.kill()
    agent.wait()

    assert _round_trip(client, b"agent is down") == b"agent is down"

    revived = agent.restarted()
    processes.append(revived)
    server.wait_for_log("identity updated", count=2)
    client.wait_for_log("identity updated", count=2)

    assert _round_trip(client, b"agent is back") == b"agent is back"


def test_half_close_from_the_client_side(agent, start_tunnel):
    """
    A client that stops writing (FIN) still gets the backend's reply: the
    end of writing crosses both tunnels and the reply comes back after it.
    """
    def reply_after_eof(connection):
        request = recv_all(connection)
        connection.sendall(b"got " + request)

    backend = Backend(reply_after_eof)
    server, client = _pair(agent, start_tunnel, backend, "--close-timeout", "10s")

    with _connect(client) as connection:
        connection.sendall(b"request")
        connection.shutdown(socket.SHUT_WR)
        assert recv_all(connection) == b"got request"
    backend.close()


def test_half_close_from_the_backend_side(agent, start_tunnel):
    """
    A backend that stops writing first: the client sees EOF, and what the
    client sends afterwards still reaches the backend.
    """
    received = []
    done = threading.Event()

    def speak_then_listen(connection):
        connection.sendall(b"banner")
        connection.shutdown(socket.SHUT_WR)
        received.append(recv_all(connection))
        done.set()

    backend = Backend(speak_then_listen)
    server, client = _pair(agent, start_tunnel, backend, "--close-timeout", "10s")

    with _connect(client) as connection:
        assert recv_all(connection) == b"banner"
        connection.sendall(b"late words")
        connection.shutdown(socket.SHUT_WR)
        assert done.wait(15)
    assert received == [b"late words"]
    backend.close()


def _pair(agent, start_tunnel, backend, *flags):
    server = start_tunnel(
        "server", backend.address, *flags,
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-uri", "spiffe://domain.test/frontend",
    )
    client = start_tunnel(
        "client", server.address, *flags,
        "--use-workload-api-addr", agent.address("frontend"),
        "--verify-uri", "spiffe://domain.test/backend",
    )
    return server, client


def test_sigterm_drains_open_connections_and_exits_zero(pair):
    """
    SIGTERM stops accepting at once, lets an open connection finish, and
    exits 0 once it has.
    """
    server, client = pair
    connection = _connect(client)
    connection.sendall(b"open")
    assert recv_all(connection, 4) == b"open"
    server.wait_for_log("allowed")

    server.signal(signal.SIGTERM)
    server.wait_for_log("shutting down")
    wait_for(lambda: not port_answers(server.port), "the listener to close")

    connection.sendall(b"still flowing")
    assert recv_all(connection, 13) == b"still flowing"
    assert server.process.poll() is None

    connection.close()
    assert server.wait(30) == 0


def test_shutdown_timeout_cuts_connections_that_stay(agent, backend, start_tunnel):
    """
    A connection still open when --shutdown-timeout runs out is cut, and the
    process still exits 0.
    """
    server, client = _pair(agent, start_tunnel, backend, "--shutdown-timeout", "1s")
    connection = _connect(client)
    connection.sendall(b"open")
    assert recv_all(connection, 4) == b"open"

    server.signal(signal.SIGTERM)

    assert server.wait(30) == 0
    assert "shutdown timeout reached: cutting 1 open connection" in server.log
    connection.settimeout(15)
    assert recv_all(connection) == b""
    connection.close()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["server", "--listen", "127.0.0.1:1"], "--target is required"),
        (["server", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
          "--use-workload-api-addr", "unix:///x.sock"],
         "needs an authorization flag"),
        (["server", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
          "--use-workload-api-addr", "unix://run/agent.sock", "--allow-all"],
         "unix:///run/agent.sock"),
        (["server", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
          "--use-workload-api-addr", "npipe:agent", "--allow-all"],
         "named pipes"),
        (["server", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
          "--use-workload-api-addr", "unix:///x.sock", "--allow-uri", "spiffe://Bad/x"],
         "--allow-uri"),
        (["client", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
          "--use-workload-api-addr", "unix:///x.sock", "--verify-uri", "http://x/y"],
         "--verify-uri"),
        (["server", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
          "--use-workload-api", "--keystore", "k.pem", "--allow-all"],
         "choose one"),
        (["server", "--listen", "nowhere", "--target", "127.0.0.1:2",
          "--use-workload-api-addr", "unix:///x.sock", "--allow-all"],
         "HOST:PORT"),
        (["server", "--no-such-flag"], "no-such-flag"),
        (["server", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:2",
          "--use-workload-api-addr", "unix:///x.sock", "--allow-all",
          "--connect-timeout", "ten"], "--connect-timeout"),
        ([], "choose a mode"),
    ],
    ids=[
        "missing-target", "no-authorization", "host-where-path-belongs",
        "named-pipe", "bad-allow-uri", "bad-verify-uri", "workload-and-keystore",
        "bad-listen", "unknown-flag", "bad-duration", "no-mode",
    ],
)
def test_bad_input_is_one_line_and_exit_2(arguments, message):
    """
    Each mistake ends in one line on stderr and exit status 2, before
    anything listens.
    """
    result = subprocess.run(
        twistd(*arguments), capture_output=True, text=True, timeout=60,
        env=environment(),
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def _rss_kib(process) -> int:
    with open(f"/proc/{process.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_pauses_the_sender_and_memory_stays_bounded(agent, start_tunnel):
    """
    A backend that stops reading makes the sender stall: the tunnels pause
    their reads instead of buffering what they cannot deliver.
    """
    release = threading.Event()

    def never_read(connection):
        release.wait(60)

    backend = Backend(never_read)
    server, client = _pair(agent, start_tunnel, backend)
    before = {tunnel.name: _rss_kib(tunnel) for tunnel in (server, client)}

    chunk = b"x" * 65536
    sent = 0
    limit = 512 * 1024 * 1024
    with _connect(client) as connection:
        connection.settimeout(2)
        try:
            while sent < limit:
                sent += connection.send(chunk)
        except socket.timeout:
            pass
        after = {tunnel.name: _rss_kib(tunnel) for tunnel in (server, client)}
    release.set()
    backend.close()

    assert sent < limit, "the sender never stalled"
    for name in before:
        growth_mib = (after[name] - before[name]) / 1024
        assert growth_mib < 32, f"{name} grew by {growth_mib:.1f} MiB"


def test_idle_peer_is_dropped_after_connect_timeout(agent, backend, start_tunnel):
    """
    A peer that connects and never sends a ClientHello is dropped after
    --connect-timeout, while another client is served meanwhile.
    """
    server, client = _pair(agent, start_tunnel, backend, "--connect-timeout", "1s")
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=15)

    assert _round_trip(client, b"served meanwhile") == b"served meanwhile"
    try:
        assert recv_all(idle) == b""
    except ConnectionResetError:
        pass
    idle.close()
    server.wait_for_log("timed out during TLS handshake")
    assert backend.accepted == 1


def test_client_refuses_a_server_with_another_spiffe_id(agent, backend, start_tunnel):
    """
    A client tunnel whose --verify-uri does not match the server's SPIFFE ID
    refuses the server; nothing reaches the backend.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("intruder"),
        "--allow-uri", "spiffe://domain.test/frontend",
    )
    client = start_tunnel(
        "client", server.address,
        "--use-workload-api-addr", agent.address("frontend"),
        "--verify-uri", "spiffe://domain.test/backend",
    )

    with _connect(client) as connection:
        connection.sendall(b"hello")
        assert recv_all(connection) == b""

    log = client.wait_for_log("refused server")
    assert "spiffe://domain.test/intruder" in log
    assert backend.accepted == 0


def test_client_without_verify_uri_accepts_any_server_in_the_bundle(
    agent, backend, start_tunnel
):
    """
    With no --verify-uri the client accepts any server that proves a SPIFFE
    ID from its trust bundle.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("intruder"),
        "--allow-uri", "spiffe://domain.test/frontend",
    )
    client = start_tunnel(
        "client", server.address,
        "--use-workload-api-addr", agent.address("frontend"),
    )

    assert _round_trip(client, b"any ID") == b"any ID"


def test_disable_authentication_on_both_sides(tmp_path, agent, backend, start_tunnel):
    """
    A server with --disable-authentication asks no client certificate; a
    client with it presents none, needs only the trust bundle, and still
    verifies the server.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("backend"),
        "--disable-authentication",
    )
    client = start_tunnel(
        "client", server.address,
        "--use-workload-api-addr", agent.address("frontend"),
        "--disable-authentication",
        "--verify-uri", "spiffe://domain.test/backend",
    )

    assert _round_trip(client, b"no client cert") == b"no client cert"
    assert "watching trust bundles" in client.log
    server.wait_for_log("(no certificate)")

    files = svid_files(agent, "frontend", tmp_path)
    with tls_connect(server.port, tls_client(None, files["ca"])) as connection:
        connection.sendall(b"plain ssl client")
        assert recv_all(connection, 16) == b"plain ssl client"


def test_client_without_certificate_is_refused(tmp_path, agent, backend, start_tunnel):
    """
    A client that presents no certificate is refused, the log says so, and
    nothing reaches the backend.
    """
    server = start_tunnel(
        "server", backend.address,
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-all",
    )
    files = svid_files(agent, "frontend", tmp_path)

    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_connect(server.port, tls_client(None, files["ca"])) as conn:
            conn.sendall(b"let me in")
            assert conn.recv(100) == b""

    log = server.wait_for_log("refused connection")
    assert "no-certificate" in log
    assert backend.accepted == 0


def _forward(listener: socket.socket, connect) -> None:
    """
    Accept on C{listener} and shuttle bytes to a fresh C{connect()} socket,
    both ways, until either side closes.
    """
    def pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    while True:
        try:
            accepted, _ = listener.accept()
        except OSError:
            return
        upstream = connect()
        threading.Thread(target=pump, args=(accepted, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, accepted), daemon=True).start()


def test_workload_api_over_tcp(agent, backend, start_tunnel):
    """
    A tcp://IP:PORT Workload API address works: here a loopback TCP port
    forwards to the dev agent's unix socket.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def to_agent():
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(str(agent.sockets["backend"]))
        return upstream

    threading.Thread(target=_forward, args=(listener, to_agent), daemon=True).start()
    try:
        server = start_tunnel(
            "server", backend.address,
            "--use-workload-api-addr", f"tcp://127.0.0.1:{port}",
            "--allow-uri", "spiffe://domain.test/frontend",
        )
        client = start_tunnel(
            "client", server.address,
            "--use-workload-api-addr", agent.address("frontend"),
        )

        assert "identity updated: spiffe://domain.test/backend" in server.log
        assert _round_trip(client, b"agent over tcp") == b"agent over tcp"
    finally:
        listener.close()


def test_unix_sockets_on_both_sides(tmp_path, agent, start_tunnel):
    """
    The client tunnel listens on a unix socket and the server tunnel
    forwards to a unix-socket backend.
    """
    backend_path = tmp_path / "echo-backend.sock"
    backend_listener = socket.socket(socket.AF_UNIX)
    backend_listener.bind(str(backend_path))
    backend_listener.listen()

    def serve():
        connection, _ = backend_listener.accept()
        with connection:
            connection.sendall(b"unix says " + recv_all(connection, 5))

    threading.Thread(target=serve, daemon=True).start()
    server = start_tunnel(
        "server", f"unix:{backend_path}",
        "--use-workload-api-addr", agent.address("backend"),
        "--allow-uri", "spiffe://domain.test/frontend",
    )
    client_path = tmp_path / "client.sock"
    client = Process(
        twistd(
            "client", "--listen", f"unix:{client_path}", "--target", server.address,
            "--use-workload-api-addr", agent.address("frontend"),
        ),
        tmp_path / "unix-client.log",
    )
    try:
        client.wait_for_log("listening on")
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(15)
            connection.connect(str(client_path))
            connection.sendall(b"hello")
            assert recv_all(connection) == b"unix says hello"
    finally:
        client.stop()
        backend_listener.close()


def test_installed_plugin_is_found_without_the_checkout(tmp_path):
    """
    twistd finds the ghosttwist plugin from the installed package alone, as
    after `pip install .` (no checkout on the path, run from elsewhere).
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)

    result = subprocess.run(
        twistd("server", "--help"), capture_output=True, text=True,
        timeout=60, env=env, cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert "--allow-uri" in result.stdout
