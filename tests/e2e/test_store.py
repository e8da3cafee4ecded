"""Issue 14, item 4: the embedded store. A real sensor with --store, curl against a local
HTTP server (in this test process, outside the traced cgroup): `flowtap query` while the
sensor runs gives the exact method, path, status and pid; `flowtap export --har` writes a
HAR 1.2 file that validates; retention by age deletes exactly the old rows."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from .helpers import (
    CURL,
    RECORD_TIMEOUT_S,
    TIMEOUT_SCALE,
    Lab,
    Peer,
    child_env,
    flowtap_command,
    wait_until,
)

pytestmark = pytest.mark.e2e

HAR_SCHEMA = Path(__file__).with_name("har12.schema.json")
BINARY = bytes(range(256))  # not UTF-8: the HAR keeps it as base64


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/hello"):
            self._reply(200, b"hello, store\n", "text/plain")
        elif self.path == "/binary":
            self._reply(200, BINARY, "application/octet-stream")
        else:
            self._reply(404, b"not here\n", "text/plain")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(201, b"made " + body, "text/plain")

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def web() -> Iterator[int]:
    """A local HTTP server in this process (not in the traced cgroup): its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _curl(e2e: Lab, *args: str) -> Peer:
    argv = [CURL, "-sS", "--noproxy", "*", "--max-time", "10", "-o", "/dev/null", *args]
    return e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")


def _flowtap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [flowtap_command(), *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30 * TIMEOUT_SCALE,
        check=False,
    )


def _query(store: Path, *args: str) -> list[dict[str, Any]]:
    done = _flowtap("query", "--store", str(store), "--output", "json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _wait_query(store: Path, count: int, *args: str) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        if not store.exists():
            return None
        rows = _query(store, *args)
        return rows if len(rows) >= count else None

    return wait_until(enough, RECORD_TIMEOUT_S, f"{count} stored records for {args}", interval=0.2)


def test_query_while_running_and_har_export(e2e: Lab, web: int, tmp_path: Path) -> None:
    store = tmp_path / "flowtap.db"
    sensor = e2e.sensor(extra=["--store", str(store), "--capture-level", "full"])
    base = f"http://127.0.0.1:{web}"
    get = _curl(e2e, f"{base}/hello?name=a%20b")
    post = _curl(e2e, "-X", "POST", "--data-binary", "widget", f"{base}/items")
    missing = _curl(e2e, f"{base}/missing")
    binary = _curl(e2e, f"{base}/binary")
    for curl in (get, post, missing, binary):
        curl.finish()

    # While the sensor runs: the store answers, per process, with the exact values.
    for curl, method, path, status in (
        (get, "GET", "/hello?name=a%20b", 200),
        (post, "POST", "/items", 201),
        (missing, "GET", "/missing", 404),
        (binary, "GET", "/binary", 200),
    ):
        [row] = _wait_query(store, 1, f"src.process.pid == {curl.pid}")
        assert row["process"]["pid"] == curl.pid
        assert row["process"]["exe"] == CURL
        assert (row["request"]["method"], row["request"]["path"]) == (method, path)
        assert row["response"]["status"] == status
    assert sensor.popen.poll() is None  # still running
    # The rule language filters; a table for people.
    [row] = _query(store, "http.res.status", "==", "404")
    assert row["process"]["pid"] == missing.pid
    posts = _query(store, 'http.req.method == "POST" and http.req.path == "/items"')
    assert [r["process"]["pid"] for r in posts] == [post.pid]
    table = _flowtap("query", "--store", str(store), f"src.process.pid == {post.pid}")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split()[:3] == ["TIME", "PID", "PROCESS"], lines
    assert lines[1].split()[1:5] == [str(post.pid), "curl", "POST", "201"], lines
    connections = _query(store, "--connections", f"src.process.pid == {get.pid}")
    assert [r["event"] for r in connections] == ["open", "close"]
    assert connections[0]["remote"] == {"ip": "127.0.0.1", "port": web}
    bad = _flowtap("query", "--store", str(store), "http.req.nosuchfield == 1")
    assert bad.returncode == 2 and "not a valid rule" in bad.stderr, bad.stderr

    # HAR 1.2, validated; bodies as captured (text, or base64 when not UTF-8).
    har_file = tmp_path / "out.har"
    done = _flowtap("export", "--store", str(store), "--har", str(har_file))
    assert done.returncode == 0, done.stderr
    har = json.loads(har_file.read_text())
    errors = [
        e.message for e in Draft202012Validator(json.loads(HAR_SCHEMA.read_text())).iter_errors(har)
    ]
    assert errors == []
    entries = {e["_process"]["pid"]: e for e in har["log"]["entries"]}
    assert set(entries) == {get.pid, post.pid, missing.pid, binary.pid}
    assert entries[get.pid]["request"]["queryString"] == [{"name": "name", "value": "a b"}]
    assert entries[get.pid]["response"]["content"]["text"] == "hello, store\n"
    assert entries[post.pid]["request"]["postData"]["text"] == "widget"
    assert entries[post.pid]["response"]["status"] == 201
    content = entries[binary.pid]["response"]["content"]
    assert content["encoding"] == "base64"
    assert base64.b64decode(content["text"]) == BINARY
    one = tmp_path / "one.har"
    done = _flowtap("export", "--store", str(store), "--har", str(one), "http.res.status == 404")
    assert done.returncode == 0, done.stderr
    assert [e["request"]["url"] for e in json.loads(one.read_text())["log"]["entries"]] == [
        f"{base}/missing"
    ]

    stats = sensor.stop()
    assert stats["sink_dropped"] == {"file": 0, "store": 0}
    assert stats["sinks"]["store"] == {"written": 12, "errors": 0, "dropped": 0}
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o600


def test_retention_by_age_deletes_exactly_the_old_rows(e2e: Lab, web: int, tmp_path: Path) -> None:
    store = tmp_path / "flowtap.db"
    max_age = 2.0 * TIMEOUT_SCALE
    e2e.sensor(extra=["--store", str(store), "--store-max-age", str(max_age)])
    old = [_curl(e2e, f"http://127.0.0.1:{web}/hello") for _ in range(3)]
    for curl in old:
        curl.finish()
    assert len(_wait_query(store, 3)) == 3
    time.sleep(max_age + 1.5)  # the old rows are now older than --store-max-age
    new = [_curl(e2e, f"http://127.0.0.1:{web}/hello") for _ in range(2)]
    for curl in new:
        curl.finish()
    new_pids = sorted(c.pid for c in new)

    def only_new() -> list[dict[str, Any]] | None:
        rows = _query(store)
        return rows if sorted(r["process"]["pid"] for r in rows) == new_pids else None

    # Writing the new records ran retention: the old ones went, all of them, and only they.
    wait_until(only_new, RECORD_TIMEOUT_S, "only the new transactions", interval=0.2)
    kept = {r["process"]["pid"] for r in _query(store, "--connections")}
    assert kept == set(new_pids)


@contextlib.contextmanager
def _small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at path, unmounted at the end whatever happens."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, timeout=30)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def test_a_full_disk_under_the_store_loses_only_store_records(e2e: Lab, tmp_path: Path) -> None:
    """The store's disk fills: its batches fail and are counted (sink_errors), the JSON file
    on another disk still gets every record, and the sensor exits cleanly."""
    connections = 150
    with _small_filesystem(tmp_path / "disk", "160k") as disk:
        store = disk / "flowtap.db"
        server = e2e.server(connections=connections, cgroup=False)
        sensor = e2e.sensor(extra=["--store", str(store)])
        # Long command lines make big rows: the store's disk fills after a few dozen.
        client = e2e.client(server, extra=["--repeat", str(connections), "--tag", "x" * 3000])
        client.finish()
        server.peer.finish()
        total = 2 * connections
        sensor.wait_for(lambda records: len(records) >= total or None, what=f"{total} records")
        stats = sensor.stop()
        written = sensor.records()
        log = sensor.stderr()
    assert len(written) == total
    assert stats["sinks"]["file"] == {"written": total, "errors": 0, "dropped": 0}
    kept = stats["sinks"]["store"]
    assert kept["errors"] > 0, stats  # the disk did fill
    assert kept["written"] + kept["errors"] + kept["dropped"] == total
    assert stats["drops"]["sink_errors"] == kept["errors"]
    assert "Traceback" not in log, log
    # Said when writes begin to fail (again: a small batch may still fit in freed pages).
    assert "could not write a record to sink store" in log, log
    assert "could not write a record to sink file" not in log, log
