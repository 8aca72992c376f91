"""
Metrics of real tunnels over real HTTP: counting accepted and refused
connections, both formats, and pushes to receivers written here.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import free_port, svid_files, tls_client, tls_connect, wait_for
from tests.test_status_process import request, start_server


def _json_metrics(port: int, path: str = "/_metrics") -> dict[str, float]:
    code, kind, body = request(port, path)
    assert (code, kind) == (200, "application/json")
    return {item["metric"]: item["value"] for item in json.loads(body)}


def _prometheus_metrics(port: int, path: str) -> dict[str, float]:
    code, kind, body = request(port, path)
    assert code == 200 and kind.startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            reason = sample.labels.get("reason")
            values[sample.name + (f"[{reason}]" if reason else "")] = sample.value
    return values


def test_metrics_count_accepted_and_refused_connections(
    agent, backend, start_tunnel, tmp_path
):
    """
    conn.open follows a real connection; an intruder's refusal is counted
    with its reason.
    """
    port = free_port()
    tunnel = start_server(
        start_tunnel, agent, backend.address, "--status", f"http://127.0.0.1:{port}"
    )
    frontend = svid_files(agent, "frontend", tmp_path)
    intruder = svid_files(agent, "intruder", tmp_path)

    with tls_connect(tunnel.port, tls_client(frontend, frontend["ca"])) as connection:
        connection.sendall(b"ping")
        assert connection.recv(4) == b"ping"
        opened = _json_metrics(port)
    closed = wait_for(
        lambda: (values := _json_metrics(port))["ghosttwist.conn.open"] == 0 and values,
        "conn.open back to 0",
    )

    with pytest.raises((ssl.SSLError, OSError)):
        with tls_connect(tunnel.port, tls_client(intruder, intruder["ca"])) as refused:
            refused.sendall(b"x")
            if not refused.recv(1):
                raise OSError("closed")
    after = wait_for(
        lambda: (values := _json_metrics(port))["ghosttwist.refused.unauthorized"]
        and values,
        "the refusal counted",
    )

    assert opened["ghosttwist.conn.open"] == 1
    assert opened["ghosttwist.accept.success"] == 1
    assert closed["ghosttwist.conn.lifetime.count"] == 1
    assert closed["ghosttwist.conn.handshake.count"] == 1
    assert after["ghosttwist.refused.unauthorized"] == 1
    assert after["ghosttwist.accept.total"] == 2
    assert after["ghosttwist.accept.error"] == 1
    assert after["ghosttwist.accept.success"] == 1


def test_json_and_prometheus_paths(agent, backend, start_tunnel):
    """
    /_metrics and /_metrics/json are the same JSON; /_metrics/prometheus and
    ?format=prometheus are Prometheus text; unknown formats are 404.
    """
    port = free_port()
    start_server(
        start_tunnel, agent, backend.address, "--status", f"http://127.0.0.1:{port}"
    )

    # The gauge follows gRPC's channel state, reported from gRPC's own
    # thread: it may reach 1 a moment after the first SVID did.
    plain = wait_for(
        lambda: (values := _json_metrics(port))["ghosttwist.workload_api.connected"]
        == 1
        and values,
        "workload_api.connected == 1",
    )
    named = _json_metrics(port, "/_metrics/json")
    prometheus = _prometheus_metrics(port, "/_metrics/prometheus")
    query = _prometheus_metrics(port, "/_metrics?format=prometheus")

    assert set(plain) == set(named)
    assert "ghosttwist.identity.expiry_seconds" in plain
    assert set(prometheus) == set(query)
    assert prometheus["ghosttwist_accept_total"] == 0
    assert prometheus["ghosttwist_identity_expiry_seconds"] > 0
    assert "ghosttwist_refused_total[no-certificate]" in prometheus
    assert request(port, "/_metrics/xml")[0] == 404


def test_ghostunnel_prefix_gives_ghostunnel_names(agent, backend, start_tunnel):
    port = free_port()
    start_server(
        start_tunnel, agent, backend.address,
        "--status", f"http://127.0.0.1:{port}", "--metrics-prefix", "ghostunnel",
    )

    names = set(_prometheus_metrics(port, "/_metrics/prometheus"))
    dotted = set(_json_metrics(port))

    assert {
        "ghostunnel_accept_total", "ghostunnel_accept_success",
        "ghostunnel_accept_error", "ghostunnel_accept_timeout",
        "ghostunnel_conn_open", "ghostunnel_conn_timeout",
        "ghostunnel_conn_lifetime_count", "ghostunnel_conn_handshake_mean",
    } <= names
    assert "ghostunnel.conn.handshake.99-percentile" in dotted


class _Lines:
    """
    A Graphite plaintext receiver on loopback, keeping every line.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                data = b""
                while chunk := connection.recv(65536):
                    data += chunk
            self.lines += data.decode().splitlines()


def test_graphite_push(agent, backend, start_tunnel):
    graphite = _Lines()
    try:
        start_server(
            start_tunnel, agent, backend.address,
            "--metrics-graphite", f"127.0.0.1:{graphite.port}",
            "--metrics-interval", "100ms",
        )
        wait_for(
            lambda: any(line.startswith("ghosttwist.accept.total 0 ")
                        for line in list(graphite.lines)),
            "a Graphite line",
        )
    finally:
        graphite.server.close()

    name, value, stamp = graphite.lines[0].split(" ")
    assert name.startswith("ghosttwist.") and stamp.isdigit()


def test_url_push(agent, backend, start_tunnel):
    received: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((self.path, self.headers["content-type"], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start_server(
            start_tunnel, agent, backend.address,
            "--metrics-url", f"http://127.0.0.1:{server.server_port}/ingest",
            "--metrics-interval", "100ms",
        )
        wait_for(lambda: received, "a POST of the metrics")
    finally:
        server.shutdown()
        server.server_close()

    path, kind, body = received[0]
    metrics = {item["metric"] for item in json.loads(body)}
    assert (path, kind) == ("/ingest", "application/json")
    assert "ghosttwist.conn.open" in metrics
