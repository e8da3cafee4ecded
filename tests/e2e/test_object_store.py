"""The S3 object store (Qtap's services.object_stores): at capture level full, bodies and
headers go to a bucket as objects named by their sha256, and records carry their URLs.

The S3 server is moto's standalone server (`moto_server`, from PyPI), on loopback, outside
the test's cgroup (the sensor does not trace it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from .helpers import CURL, PYTHON, TIMEOUT_SCALE, Lab, Peer, wait_until

pytestmark = pytest.mark.e2e

ACCESS = "FTTESTACCESS7731"
SECRET = "ft-test-secret-9d2c41"

# Echoes a POST's body; fixed Date so that identical requests get identical headers.
SERVER = r"""
import json, os, signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
signal.alarm(round(60 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def date_time_string(self, timestamp=None): return "Thu, 01 Jan 2026 00:00:00 GMT"
    def do_POST(self):
        body = b"echo:" + self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "session=abc123")
        self.end_headers()
        self.wfile.write(body)

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(json.dumps({"event": "listening", "pid": os.getpid(), "port": server.server_port}),
      flush=True)
server.serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MotoServer:
    """moto_server on a free loopback port."""

    def __init__(self, log: Path) -> None:
        port = _free_port()
        self.endpoint = f"127.0.0.1:{port}"
        self._log = log.open("wb")
        server = Path(sys.executable).with_name("moto_server")
        self.popen = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

        def accepts() -> bool:
            assert self.popen.poll() is None, log.read_text()
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(accepts, 20 * TIMEOUT_SCALE, "moto_server listening", interval=0.05)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10 * TIMEOUT_SCALE)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._log.close()


@pytest.fixture
def moto_server(tmp_path: Path) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moto(moto_server: MotoServer) -> str:
    """The server's host:port."""
    return moto_server.endpoint


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=f"http://{endpoint}",
        region_name="us-east-1",
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
    )


def start_server(e2e: Lab, tmp_path: Path) -> tuple[Peer, int]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = e2e.spawn([PYTHON, str(script)], cgroup=e2e.cgroup, stem="http-server")
    return server, int(server.wait_message("listening")["port"])


def post(e2e: Lab, port: int, body: str) -> None:
    argv = [CURL, "-sS", "--noproxy", "*", "-H", "Authorization: Bearer s3cr3t", "-d", body]
    e2e.spawn([*argv, f"http://127.0.0.1:{port}/upload"], cgroup=e2e.cgroup, stem="curl").finish()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def headers_bytes(part: dict[str, Any]) -> bytes:
    return json.dumps(part["headers"], separators=(",", ":")).encode()


def test_bodies_and_headers_go_to_the_bucket_once(
    e2e: Lab, tmp_path: Path, moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = "flowtap-bodies"
    client = s3_client(moto)
    client.create_bucket(Bucket=bucket)
    # Qtap's form: one key from the environment, one as text in the (owner-only) file.
    monkeypatch.setenv("TEST_S3_ACCESS", ACCESS)
    config = tmp_path / "qtap.yaml"
    config.write_text(
        "version: 2\n"
        "services:\n"
        "  object_stores:\n"
        "    - id: bodies\n"
        "      type: s3\n"
        f"      endpoint: {moto}\n"
        f"      bucket: {bucket}\n"
        "      region: us-east-1\n"
        "      insecure: true\n"
        "      access_key: {type: env, value: TEST_S3_ACCESS}\n"
        f"      secret_key: {{type: text, value: {SECRET}}}\n"
    )
    config.chmod(0o600)
    _server, port = start_server(e2e, tmp_path)
    extra = ["--direction", "egress", "--capture-level", "full", "--config", str(config)]
    sensor = e2e.sensor(extra=extra)
    body = "name=flowtap&payload=" + "x" * 300
    post(e2e, port, body)
    post(e2e, port, body)  # the same bytes again: stored once
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 2, what="two http records")
    sensor.finish()
    records = sensor.http_records()

    assert len(records) == 2
    sent, echoed = body.encode(), b"echo:" + body.encode()
    expected: dict[str, bytes] = {sha(sent): sent, sha(echoed): echoed}
    for record in records:
        request, response = record["request"], record["response"]
        assert "body" not in request and "body" not in response
        assert request["body_url"] == f"http://{moto}/{bucket}/{sha(sent)}"
        assert response["body_url"] == f"http://{moto}/{bucket}/{sha(echoed)}"
        assert ["Authorization", "Bearer [REDACTED]"] in request["headers"]
        for part in (request, response):
            data = headers_bytes(part)
            assert part["headers_url"] == f"http://{moto}/{bucket}/{sha(data)}"
            expected[sha(data)] = data
    assert len(expected) == 4  # both transactions' headers are the same bytes too

    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(item["Key"] for item in listed) == sorted(expected)
    for key, data in expected.items():
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    stats = sensor.stats
    assert stats is not None
    assert stats["objects"] == {"uploaded": 4, "deduplicated": 4, "errors": 0, "dropped": 0}
    assert stats["drops"]["object_upload_errors"] == 0
    for text in (sensor.output.read_text(), sensor.stderr()):
        assert ACCESS not in text and SECRET not in text


@pytest.mark.parametrize("fault", ["no such bucket", "server stopped"])
def test_s3_refusing_writes_loses_objects_counted_not_records(
    e2e: Lab, tmp_path: Path, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    monkeypatch.setenv("FLOWTAP_S3_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("FLOWTAP_S3_SECRET_KEY", SECRET)
    bucket = "no-such-bucket"
    if fault == "server stopped":
        bucket = "flowtap-bodies"
        s3_client(moto_server.endpoint).create_bucket(Bucket=bucket)
    _server, port = start_server(e2e, tmp_path)
    s3 = ["--s3-endpoint", moto_server.endpoint, "--s3-bucket", bucket, "--s3-insecure"]
    template = ["--s3-access-url", "https://objects.example/{{BUCKET}}/{{DIGEST}}"]
    extra = ["--direction", "egress", "--capture-level", "full", *s3, *template]
    sensor = e2e.sensor(extra=extra)
    if fault == "server stopped":
        moto_server.stop()
    bodies = ["a" * 10, "b" * 20, "c" * 30]  # distinct lengths: distinct headers too
    for body in bodies:
        post(e2e, port, body)
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 3, what="three http records")
    stats = sensor.stop()
    records = sensor.http_records()

    assert [r["request"]["body_url"] for r in records] == [
        f"https://objects.example/{bucket}/{sha(body.encode())}" for body in bodies
    ]
    urls = {
        part[key]
        for record in records
        for part in (record["request"], record["response"])
        for key in ("body_url", "headers_url")
    }
    assert len(urls) == 12  # every object differs: each is one failed upload
    objects = stats["objects"]
    assert (objects["uploaded"], objects["deduplicated"]) == (0, 0)
    # Each object failed, or (a server that is gone, retried) was still queued at exit.
    assert objects["errors"] + objects["dropped"] == 12
    assert objects["errors"] >= 1
    if fault == "no such bucket":
        assert objects["errors"] == 12
    assert stats["drops"]["object_upload_errors"] == objects["errors"]
    assert stats["drops"]["object_upload_dropped"] == objects["dropped"]
    log = sensor.stderr()
    warnings = log.count(f"could not upload an object to s3 bucket {bucket}")
    assert 1 <= warnings < 12, log  # rate-limited
    assert ("NoSuchBucket" if fault == "no such bucket" else "EndpointConnectionError") in log
    assert ACCESS not in log and SECRET not in log
    assert ACCESS not in sensor.output.read_text()
