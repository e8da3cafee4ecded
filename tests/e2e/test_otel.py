"""Issue 14, item 2: the otel event store. A real sensor (`flowtap run`) sends every record
as an OTLP log record to a receiver this test runs on loopback (gRPC LogsService, or
OTLP/HTTP protobuf), while it also writes the records to its JSON-lines file: what
arrived is compared with the file field by field. Fault: the receiver stops for 10 s
(scaled) and comes back; every record the file has either arrived or is counted lost."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from flowtap.sinks.otel import flatten

from .helpers import PYTHON, RECORD_TIMEOUT_S, TIMEOUT_SCALE, Lab, Peer, wait_until
from .otlp_receiver import Arrived, GrpcReceiver, HttpReceiver

pytestmark = pytest.mark.e2e

SERVER = r"""
import json, os, signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
signal.alarm(round(120 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_GET(self):
        body = b"x" * int(self.path.rsplit("/", 1)[1])
        self.send_response(203)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(json.dumps({"event": "listening", "pid": os.getpid(), "port": server.server_port}),
      flush=True)
server.serve_forever()
"""
SECRET = "Bearer s3cr3t-otel-token"


def start_server(e2e: Lab, tmp_path: Path) -> tuple[Peer, int]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = e2e.spawn([PYTHON, str(script)], cgroup=e2e.cgroup, stem="http-server")
    return server, int(server.wait_message("listening")["port"])


def canonical(attributes: dict[str, Any]) -> str:
    return json.dumps(attributes, sort_keys=True)


def same_records(arrived: list[Arrived], written: list[dict[str, Any]]) -> None:
    """Every record of the file arrived once, with exactly its fields."""
    assert sorted(canonical(a.attributes) for a in arrived) == sorted(
        canonical(flatten(r)) for r in written
    )


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_records_arrive_as_otlp_log_records(e2e: Lab, tmp_path: Path, protocol: str) -> None:
    receiver: GrpcReceiver | HttpReceiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    receiver.start()
    try:
        endpoint = (
            f"127.0.0.1:{receiver.port}"
            if protocol == "grpc"
            else f"http://127.0.0.1:{receiver.port}"
        )
        sensor = e2e.sensor(
            extra=[
                "--otel-endpoint", endpoint, "--otel-protocol", protocol, "--otel-insecure",
                "--otel-header", f"Authorization={SECRET}", "--otel-header", "X-Tenant=t1",
                "--otel-service-name", "edge-sensor", "--otel-environment", "staging",
            ]
        )  # fmt: skip
        server, port = start_server(e2e, tmp_path)
        curl = e2e.curl(f"http://127.0.0.1:{port}/items/7")
        curl.finish()
        sensor.wait_for_closed(pid=curl.pid, direction="egress")
        report = sensor.stop()
        server.kill()
        written = sensor.all_records()

        def all_arrived() -> list[Arrived] | None:
            got = receiver.collected.snapshot()
            return got if len(got) >= len(written) else None

        arrived = wait_until(
            all_arrived,
            RECORD_TIMEOUT_S,
            "every record at the OTLP receiver",
        )
    finally:
        receiver.stop()
    assert len(arrived) == len(written)
    same_records(arrived, written)
    # The curl request, field by field, against the file's record.
    (http,) = [r for r in written if r["type"] == "http" and r["process"]["pid"] == curl.pid]
    (otel,) = [a for a in arrived if a.body == "http" and a.attributes["process.pid"] == curl.pid]
    assert otel.attributes["request.method"] == http["request"]["method"] == "GET"
    assert otel.attributes["request.path"] == http["request"]["path"] == "/items/7"
    assert otel.attributes["response.status"] == http["response"]["status"] == 203
    assert otel.attributes["connection_id"] == http["connection_id"]
    (opened,) = [
        r
        for r in written
        if r["type"] == "connection" and r.get("event") == "open"
        and r["process"]["pid"] == curl.pid
    ]  # fmt: skip
    (otel_open,) = [
        a
        for a in arrived
        if a.body == "connection open" and a.attributes["process.pid"] == curl.pid
    ]
    assert otel_open.attributes["remote.port"] == opened["remote"]["port"] == port
    assert otel_open.attributes["local.port"] == opened["local"]["port"]
    assert otel_open.attributes["direction"] == "egress"
    # Resource and headers: as configured, on every record.
    for a in arrived:
        assert a.resource["service.name"] == "edge-sensor"
        assert a.resource["deployment.environment"] == "staging"
        assert a.headers["authorization"] == SECRET
        assert a.headers["x-tenant"] == "t1"
    assert report["sinks"]["otel"] == {"written": len(written), "errors": 0, "dropped": 0}
    assert SECRET not in sensor.stderr() and "s3cr3t" not in sensor.stderr()


def test_receiver_down_then_back(e2e: Lab, tmp_path: Path) -> None:
    """The collector is down for 10 s (scaled): the consumer goes on (no kernel drops),
    records after its return arrive, and arrived + counted lost == written."""
    receiver = GrpcReceiver()
    receiver.start()
    port_otlp = receiver.port
    sensor = e2e.sensor(extra=["--otel-endpoint", f"127.0.0.1:{port_otlp}", "--otel-insecure"])
    server, port = start_server(e2e, tmp_path)
    before = e2e.curl(f"http://127.0.0.1:{port}/items/1")
    before.finish()
    wait_until(
        lambda: any(a.attributes.get("process.pid") == before.pid
                    for a in receiver.collected.snapshot()),
        RECORD_TIMEOUT_S,
        "the first curl's records at the receiver",
    )  # fmt: skip
    receiver.stop()
    down_until = time.monotonic() + 10 * TIMEOUT_SCALE
    during: list[Peer] = []
    while time.monotonic() < down_until:
        curl = e2e.curl(f"http://127.0.0.1:{port}/items/2")
        curl.finish()
        during.append(curl)
        time.sleep(0.5)
    # The consumer kept up while the collector was down: the file has every curl's close.
    for curl in during:
        sensor.wait_for_closed(pid=curl.pid, direction="egress")
    restarted = GrpcReceiver(port_otlp)
    restarted.collected = receiver.collected  # one tally across both lives
    restarted.start()
    try:
        after = e2e.curl(f"http://127.0.0.1:{port}/items/3")
        after.finish()
        sensor.wait_for_closed(pid=after.pid, direction="egress")
        wait_until(
            lambda: any(a.attributes.get("process.pid") == after.pid and a.body == "http"
                        for a in restarted.collected.snapshot()),
            RECORD_TIMEOUT_S * 3,
            "records sent after the receiver's return",
        )  # fmt: skip
        report = sensor.stop()
        server.kill()
    finally:
        restarted.stop()
    written = sensor.all_records()
    arrived = restarted.collected.snapshot()
    otel = report["sinks"]["otel"]
    # Nothing lost silently: each record written to the file arrived or is counted.
    assert len(arrived) + otel["errors"] + otel["dropped"] == len(written), (otel, len(arrived))
    assert otel["written"] == len(arrived)
    assert report["sinks"]["file"] == {"written": len(written), "errors": 0, "dropped": 0}
    # The consumer never stalled: the only losses are the otel sink's, counted.
    nonzero = {k: n for k, n in report["drops"].items() if n}
    counted = {"sink_errors": otel["errors"], "sink_dropped": otel["dropped"]}
    assert nonzero == {k: n for k, n in counted.items() if n}, nonzero
    # What arrived is records of the file, each once.
    file_keys = {canonical(flatten(r)) for r in written}
    arrived_keys = [canonical(a.attributes) for a in arrived]
    assert len(set(arrived_keys)) == len(arrived_keys)
    assert set(arrived_keys) <= file_keys
    print(f"otel fault: written={len(written)} arrived={len(arrived)} counted_lost={otel}")
