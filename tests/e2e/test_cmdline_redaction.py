"""process.cmdline without credentials (issue 15, item 9): a real curl with a token."""

from __future__ import annotations

import pytest

from .helpers import CURL, Lab, find_pairs, http_of

pytestmark = pytest.mark.e2e

TOKEN = "s3cr3t-token-value"


def test_curl_credentials_are_redacted(e2e: Lab) -> None:
    server = e2e.server(mode="http", cgroup=False)
    sensor = e2e.sensor()
    argv = [
        CURL, "-sS", "--noproxy", "*", "--max-time", "10", "-o", "/dev/null",
        "-H", f"Authorization: Bearer {TOKEN}", "-u", f"alice:{TOKEN}",
        "--oauth2-bearer", TOKEN, f"http://bob:{TOKEN}@127.0.0.1:{server.port}/",
    ]  # fmt: skip
    curl = e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    closed = sensor.wait_for_closed(pid=curl.pid, remote_port=server.port)
    records = sensor.finish()
    cmdline = closed["process"]["cmdline"]
    assert TOKEN not in " ".join(cmdline), cmdline
    assert cmdline == [
        CURL, "-sS", "--noproxy", "*", "--max-time", "10", "-o", "/dev/null",
        "-H", "Authorization: Bearer [REDACTED]", "-u", "alice:[REDACTED]",
        "--oauth2-bearer", "[REDACTED]", f"http://bob:[REDACTED]@127.0.0.1:{server.port}/",
    ]  # fmt: skip
    assert find_pairs(records, pid=curl.pid)


def test_http_credentials_are_redacted(e2e: Lab) -> None:
    """Issue 15, item 11: an unknown Authorization scheme goes whole; credential query
    parameters and wider credential headers are redacted in the http record."""
    server = e2e.server(mode="http", cgroup=False)
    sensor = e2e.sensor(extra=["--capture-level", "headers"])
    url = f"http://127.0.0.1:{server.port}/cb?api_key={TOKEN}&page=2&X-Amz-Signature={TOKEN}"
    argv = [
        CURL, "-sS", "--noproxy", "*", "--max-time", "10", "-o", "/dev/null",
        "-H", f"Authorization: RAWAUTH10 {TOKEN}", "-H", f"X-Auth-Key: {TOKEN}",
        "-H", f"X-Hub-Signature-256: sha256={TOKEN}", url,
    ]  # fmt: skip
    curl = e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    (record,) = http_of(sensor, curl.pid, 1)
    request = record["request"]
    assert request["path"] == "/cb?api_key=[REDACTED]&page=2&X-Amz-Signature=[REDACTED]"
    assert request["url"] == f"http://127.0.0.1:{server.port}{request['path']}"
    headers = dict((name.lower(), value) for name, value in request["headers"])
    assert headers["authorization"] == "[REDACTED]"
    assert headers["x-auth-key"] == "[REDACTED]"
    assert headers["x-hub-signature-256"] == "[REDACTED]"
    assert TOKEN not in str(sensor.all_records())
    sensor.finish()
