"""
The status port of real tunnels: twistd processes, the dev agent, HTTP,
HTTPS and unix sockets on loopback.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import subprocess
import time

from cryptography import x509

from tests.processes import (
    Backend,
    Process,
    echo,
    environment,
    free_port,
    svid_files,
    twistd,
    wait_for,
)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=15)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(self.path)


def request(port: int | str, path: str, method: str = "GET", context=None):
    """
    One HTTP request to the status port: a TCP port on 127.0.0.1 (HTTPS
    when C{context} is given) or a unix socket path.

    @return: status code, content type and body.
    """
    if isinstance(port, str):
        connection = _UnixHTTPConnection(port)
    elif context is not None:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=15, context=context
        )
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("content-type"), response.read()
    finally:
        connection.close()


def status(port, context=None) -> tuple[int, dict]:
    code, _, body = request(port, "/_status", context=context)
    return code, json.loads(body)


def start_server(start_tunnel, agent, target: str, *flags: str, workload="backend"):
    return start_tunnel(
        "server", target,
        "--use-workload-api-addr", agent.address(workload),
        "--allow-uri", "spiffe://domain.test/frontend",
        *flags,
    )


def _status_answers(port) -> bool:
    try:
        request(port, "/_status")
    except OSError:
        return False
    return True


def test_status_reports_identity_and_backend(agent, backend, start_tunnel):
    """
    /_status over plain HTTP: ghostunnel's fields, 200, and the identity the
    agent issued.
    """
    port = free_port()
    start_server(start_tunnel, agent, backend.address, "--status", f"http://127.0.0.1:{port}")
    issued = agent.fetch("backend").default_svid.leaf

    code, document = status(port)

    assert code == 200
    assert (document["ok"], document["status"], document["message"]) == (
        True, "ok", "listening",
    )
    assert document["backend_ok"] is True
    assert document["forward_address"] == backend.address
    for field in ("listen_address", "time", "last_reload", "hostname", "revision"):
        assert document[field]
    identity = document["identity"]
    assert identity["source"] == "workload-api"
    assert identity["spiffe_id"] == "spiffe://domain.test/backend"
    assert identity["serial"] == format(issued.serial_number, "x")
    assert identity["trust_domains"] == {"domain.test": 1}
    assert identity["seconds_to_expiry"] > 0
    assert identity["workload_api"]["state"] == "connected"


def test_status_turns_503_when_the_backend_stops(agent, start_tunnel):
    backend = Backend(echo)
    port = free_port()
    start_server(start_tunnel, agent, backend.address, "--status", f"http://127.0.0.1:{port}")
    assert status(port)[0] == 200

    backend.close()
    code, document = wait_for(
        lambda: (result := status(port))[0] == 503 and result, "a 503 status"
    )

    assert document["backend_ok"] is False
    assert document["backend_status"] == "critical"
    assert document["backend_error"]


def test_target_status_url_decides_backend_health(agent, backend, start_tunnel, tmp_path):
    """
    --target-status: the backend is healthy while the URL answers 2xx.
    """
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "health").write_text("ok\n")
    web_port = free_port()
    web = subprocess.Popen(
        ["python3", "-m", "http.server", str(web_port), "--bind", "127.0.0.1"],
        cwd=tmp_path / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _status_answers_plain(web_port), "the health server")
        port = free_port()
        start_server(
            start_tunnel, agent, backend.address,
            "--status", f"http://127.0.0.1:{port}",
            "--target-status", f"http://127.0.0.1:{web_port}/health",
        )
        assert status(port)[0] == 200

        (tmp_path / "www" / "health").unlink()
        code, document = status(port)
    finally:
        web.terminate()
        web.wait()

    assert code == 503
    assert "404" in document["backend_error"]


def _status_answers_plain(port: int) -> bool:
    try:
        request(port, "/")
    except OSError:
        return False
    return True


def test_https_status_presents_the_tunnel_identity(agent, backend, start_tunnel, tmp_path):
    """
    HOST:PORT serves HTTPS with the tunnel's own SVID and asks no client
    certificate.
    """
    port = free_port()
    start_server(start_tunnel, agent, backend.address, "--status", f"127.0.0.1:{port}")
    files = svid_files(agent, "frontend", tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(files["ca"]))
    wait_for(lambda: _tls_answers(port, context), "the HTTPS status port")

    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        with context.wrap_socket(raw) as connection:
            presented = x509.load_der_x509_certificate(
                connection.getpeercert(binary_form=True)
            )
    code, document = status(port, context)

    assert code == 200
    assert format(presented.serial_number, "x") == document["identity"]["serial"]
    uris = presented.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["spiffe://domain.test/backend"]


def _tls_answers(port: int, context) -> bool:
    try:
        request(port, "/_status", context=context)
    except OSError:
        return False
    return True


def test_unix_socket_status(agent, backend, start_tunnel, tmp_path):
    path = str(tmp_path / "status.sock")
    start_server(start_tunnel, agent, backend.address, "--status", f"unix:{path}")
    wait_for(lambda: _status_answers(path), "the unix status socket")

    code, document = status(path)

    assert (code, document["ok"]) == (200, True)


def test_identity_object_tracks_rotation(agent, backend, start_tunnel):
    """
    SIGUSR1 makes the agent issue new SVIDs: serial and not_after change,
    and the rotation is counted.
    """
    port = free_port()
    start_server(start_tunnel, agent, backend.address, "--status", f"http://127.0.0.1:{port}")
    before = status(port)[1]["identity"]
    fetched = time.time()
    wait_for(lambda: time.time() >= int(fetched) + 1, "the next second")

    agent.signal(signal.SIGUSR1)
    after = wait_for(
        lambda: (new := status(port)[1]["identity"])["serial"] != before["serial"]
        and new,
        "a new serial on /_status",
    )

    assert after["not_after"] > before["not_after"]
    assert after["last_update"] >= before["last_update"]
    _, _, body = request(port, "/_metrics")
    values = {item["metric"]: item["value"] for item in json.loads(body)}
    assert values["ghosttwist.identity.rotations"] == 1


def test_expired_identity_turns_503(tmp_path, backend, processes):
    """
    An agent that dies leaves the tunnel with an SVID that runs out; once it
    has, the status is 503 and says why.
    """
    from tests.processes import DevAgent

    agent = DevAgent(tmp_path, ("backend",), "--svid-ttl", "3s")
    processes.append(agent)
    port = free_port()
    tunnel = Process(
        twistd(
            "server", "--listen", f"127.0.0.1:{free_port()}", "--target", backend.address,
            "--use-workload-api-addr", agent.address("backend"),
            "--allow-all", "--status", f"http://127.0.0.1:{port}",
        ),
        tmp_path / "short-lived.log",
    )
    processes.append(tunnel)
    tunnel.wait_for_log("listening on")

    agent.process.kill()
    agent.wait()
    code, document = wait_for(
        lambda: (result := status(port))[0] == 503 and result, "an expired identity"
    )

    assert document["backend_ok"] is True
    assert "expired" in document["identity"]["error"]


def test_shutdown_endpoint_drains_and_exits_0(agent, backend, start_tunnel):
    port = free_port()
    tunnel = start_server(
        start_tunnel, agent, backend.address,
        "--status", f"http://127.0.0.1:{port}", "--enable-shutdown",
    )
    assert request(port, "/_shutdown")[0] == 405

    code, _, body = request(port, "/_shutdown", method="POST")

    assert (code, body) == (200, b"shutting down\n")
    assert tunnel.wait() == 0
    assert "POST /_shutdown" in tunnel.log


def test_shutdown_endpoint_is_off_by_default(agent, backend, start_tunnel):
    port = free_port()
    start_server(start_tunnel, agent, backend.address, "--status", f"http://127.0.0.1:{port}")

    assert request(port, "/_shutdown", method="POST")[0] == 404
    assert status(port)[0] == 200


def test_systemd_notifications(agent, backend, tmp_path, processes):
    """
    With NOTIFY_SOCKET and WATCHDOG_USEC set, the tunnel sends READY=1 once
    it listens with an identity, a STATUS= line naming it, and keeps
    sending WATCHDOG=1.
    """
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(15)
    tunnel = Process(
        twistd(
            "server", "--listen", f"127.0.0.1:{free_port()}", "--target", backend.address,
            "--use-workload-api-addr", agent.address("backend"), "--allow-all",
        ),
        tmp_path / "notified.log",
        env=environment(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000"),
    )
    processes.append(tunnel)

    messages: list[str] = []
    try:
        def received(text: str, count: int = 1):
            while sum(text in message for message in messages) < count:
                messages.append(listener.recv(4096).decode())
            return True

        received("READY=1")
        received("WATCHDOG=1", 3)
    finally:
        listener.close()

    ready = next(message for message in messages if "READY=1" in message)
    assert "STATUS=listening on " in ready
    assert "spiffe://domain.test/backend" in ready
