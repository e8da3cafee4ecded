"""process.cmdline without credentials (issue 15, item 9): a real curl with a token."""

from __future__ import annotations

import pytest

from .helpers import CURL, Lab, find_pairs

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
