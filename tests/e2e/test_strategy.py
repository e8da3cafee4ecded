"""QPOINT_STRATEGY=ignore: the process is kept out of all capture, whether it started
before the sensor (read from /proc) or after (read in the kernel at exec); a sibling
without it in the same cgroup is reported as usual."""

from __future__ import annotations

import pytest

from .helpers import CURL, PEER, PYTHON, Lab, child_env

pytestmark = pytest.mark.e2e


def test_ignored_processes_are_not_captured(e2e: Lab) -> None:
    web = e2e.server(mode="http", reply=33, connections=2)
    raw = e2e.server(read=10, reply=20)
    url = f"http://127.0.0.1:{web.port}/"
    go = e2e.file("go")
    ignored_env = {**child_env(), "QPOINT_STRATEGY": "ignore"}
    # Started before the sensor: a client that waits for the go file, then connects.
    early_argv = [PYTHON, str(PEER), "client", "--port", str(raw.port), "--go", str(go)]
    early = e2e.spawn(
        [*early_argv, "--send", "10", "--expect", "20"],
        cgroup=e2e.cgroup,
        stem="early",
        env=ignored_env,
    )
    sensor = e2e.sensor()
    go.touch()
    early.finish()
    late = e2e.spawn(
        [CURL, "-sS", "--noproxy", "*", "--max-time", "10", "-o", "/dev/null", url],
        cgroup=e2e.cgroup,
        stem="late",
        env=ignored_env,
    )
    late.finish()
    seen = e2e.curl(url)
    seen.finish()
    closed = sensor.wait_for_closed(pid=seen.pid, direction="egress")
    web.peer.finish()
    raw.peer.finish()
    records = sensor.finish()

    pids = {record["process"]["pid"] for record in records}
    assert early.pid not in pids
    assert late.pid not in pids
    assert closed["remote"] == {"ip": "127.0.0.1", "port": web.port}
    # Every connection happened. The servers are not ignored, so each one's side of every
    # connection is reported; of the clients, only the plain curl is.
    assert len(web.peer.messages("served")) == 2
    assert len(raw.peer.messages("served")) == 1
    closes = [r for r in records if r.get("event") == "close"]
    assert [r["process"]["pid"] for r in closes if r["direction"] == "egress"] == [seen.pid]
    assert sorted(r["process"]["pid"] for r in closes if r["direction"] == "ingress") == sorted(
        [web.peer.pid, web.peer.pid, raw.peer.pid]
    )
