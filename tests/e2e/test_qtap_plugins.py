"""Qtap's access_logs plugin, QPOINT_TAGS and the file's env tags, and QPOINT_STRATEGY=audit,
from a real sensor started with a Qtap configuration file."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import CURL, PYTHON, Lab, Peer, assert_well_formed
from .test_capture_rules import SERVER
from .test_dns import DNS_PEER

pytestmark = pytest.mark.e2e

# A client that waits before it speaks, so the sensor reads its environment while it
# lives (tags and strategy are read from /proc/PID/environ once, at its exec).
CLIENT = r"""
import json, os, sys, time, urllib.request
time.sleep(float(sys.argv[2]))
with urllib.request.urlopen(sys.argv[1], timeout=10) as answer:
    answer.read()
print(json.dumps({"event": "done", "pid": os.getpid()}), flush=True)
"""

ACCESS_LOGS = """\
version: 2
stacks:
  s:
    plugins:
      - type: http_capture
        config:
          level: summary
      - type: access_logs
        config:
          mode: summary
          format: json
          rules:
            - name: errors in full
              expr: http.res.status >= 500
              mode: full
            - name: quiet
              expr: http.req.path == "/status/202"
              mode: none
      - type: http_metrics
tap:
  http:
    stack: s
"""


def _server(e2e: Lab, tmp_path: Path) -> tuple[Peer, int]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = e2e.spawn([PYTHON, str(script)], cgroup=e2e.cgroup, stem="status-server")
    return server, int(server.wait_message("listening")["port"])


def _of(records: list[dict[str, Any]], kind: str, pid: int) -> list[dict[str, Any]]:
    return [r for r in records if r.get("type") == kind and r["process"]["pid"] == pid]


def test_access_logs_one_line_per_transaction_at_its_mode(e2e: Lab, tmp_path: Path) -> None:
    server, port = _server(e2e, tmp_path)
    config = tmp_path / "qtap.yaml"
    config.write_text(ACCESS_LOGS)
    sensor = e2e.sensor(extra=["--config", str(config)])
    curls: dict[int, int] = {}
    for status in (200, 503, 202):
        url = f"http://127.0.0.1:{port}/status/{status}"
        curl = e2e.spawn([CURL, "-sS", "--noproxy", "*", url], cgroup=e2e.cgroup, stem="curl")
        curl.finish()
        curls[status] = curl.pid
    sensor.wait_for(
        lambda _r: all(_of(sensor.all_records(), "http", pid) for pid in curls.values()),
        what="the http records of the three curls",
    )
    sensor.finish()
    records = sensor.all_records()
    exe = str(Path(CURL).resolve())

    ok = _of(records, "access_log", curls[200])
    assert len(ok) == 1
    line = ok[0]
    assert line["timestamp"].endswith("Z")
    assert line["process"]["pid"] == curls[200]
    assert {
        k: v for k, v in line.items() if k not in ("timestamp", "process", "connection_id")
    } == {
        "type": "access_log",
        "mode": "summary",
        "format": "json",
        "msg": "HTTP transaction",
        "bin": exe,
        "direction": "egress",
        "method": "GET",
        "url": f"http://127.0.0.1:{port}/status/200",
        "status": 200,
    }
    (failed,) = _of(records, "access_log", curls[503])
    assert failed["mode"] == "full"
    assert failed["meta"] == {
        "bytes_sent": 0,
        "bytes_received": len(b"body-503"),
        "pid": curls[503],
        "exe": exe,
    }
    assert failed["request"]["method"] == "GET"
    assert failed["request"]["url"] == f"http://127.0.0.1:{port}/status/503"
    assert failed["request"]["proto"] == "http1"
    assert failed["request"]["headers"]["Host"] == f"127.0.0.1:{port}"
    assert failed["response"]["status"] == 503
    assert failed["response"]["headers"]["Content-Type"] == "text/plain"
    assert failed["response"]["body"] == "body-503"
    assert _of(records, "access_log", curls[202]) == []  # mode none: no line
    # The http_capture records are there too, one per transaction, at summary.
    for pid in curls.values():
        (http,) = _of(records, "http", pid)
        assert "headers" not in http["request"]
    # The server's side (ingress) gets its lines as well.
    served = _of(records, "access_log", server.pid)
    assert sorted(r.get("status") or r["response"]["status"] for r in served) == [200, 503]
    assert_well_formed([r for r in records if r["type"] != "access_log"])


TAGS = """\
version: 2
stacks:
  s:
    plugins:
      - type: http_capture
        config:
          level: summary
tap:
  http:
    stack: s
tags:
  - key: owner
    source: env
    location: OWNER
"""


def test_tags_from_the_environment_on_every_record(e2e: Lab, tmp_path: Path) -> None:
    _server_peer, port = _server(e2e, tmp_path)
    config = tmp_path / "qtap.yaml"
    config.write_text(TAGS)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    sensor = e2e.sensor(extra=["--config", str(config)])
    url = f"http://127.0.0.1:{port}/status/200"
    env = {"QPOINT_TAGS": "team:payments, Env:Prod,bad", "OWNER": "Alice"}
    tagged = e2e.spawn([PYTHON, str(script), url, "1"], cgroup=e2e.cgroup, stem="tagged", env=env)
    plain = e2e.spawn([PYTHON, str(script), url, "1"], cgroup=e2e.cgroup, stem="plain")
    for client in (tagged, plain):
        client.wait_message("done")
        assert client.wait() == 0
        sensor.wait_for_closed(pid=client.pid)
    sensor.wait_for(
        lambda _r: _of(sensor.all_records(), "http", tagged.pid), what="the tagged http record"
    )
    sensor.finish()
    records = sensor.all_records()
    mine = [r for r in records if r["process"]["pid"] == tagged.pid]
    assert {r["type"] for r in mine} == {"connection", "http"}
    assert len([r for r in mine if r["type"] == "connection"]) == 2  # open and close
    want = {"env": ["prod"], "owner": ["alice"], "team": ["payments"]}
    assert all(r["tags"] == want for r in mine), mine
    assert all("tags" not in r for r in records if r["process"]["pid"] == plain.pid)
    assert_well_formed(records)
    warning = f"pid {tagged.pid}: QPOINT_TAGS entry 'bad' is not KEY:VALUE; ignored"
    assert warning in sensor.stderr()


AUDIT = """\
version: 2
stacks:
  s:
    plugins:
      - type: http_capture
        config:
          level: full
      - type: access_logs
tap:
  http:
    stack: s
"""


def test_audit_strategy_records_connections_without_payload(e2e: Lab, tmp_path: Path) -> None:
    server, port = _server(e2e, tmp_path)
    config = tmp_path / "qtap.yaml"
    config.write_text(AUDIT)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    sensor = e2e.sensor(extra=["--config", str(config)])
    url = f"http://127.0.0.1:{port}/status/200"
    audited = e2e.spawn(
        [PYTHON, str(script), url, "1"],
        cgroup=e2e.cgroup,
        stem="audited",
        env={"QPOINT_STRATEGY": "audit"},
    )
    # The filter leaves this one out: it is observed, payloads and all.
    observed = e2e.spawn(
        [PYTHON, str(script), url, "1"],
        cgroup=e2e.cgroup,
        stem="observed",
        env={"QPOINT_STRATEGY": "audit,exe.suffix:/no-such-program"},
    )
    for client in (audited, observed):
        client.wait_message("done")
        assert client.wait() == 0
        sensor.wait_for_closed(pid=client.pid)
    sensor.wait_for(
        lambda _r: _of(sensor.all_records(), "http", observed.pid), what="observed's record"
    )
    sensor.finish()
    records = sensor.all_records()
    opened = [r for r in _of(records, "connection", audited.pid) if r["event"] == "open"]
    closed = [r for r in _of(records, "connection", audited.pid) if r["event"] == "close"]
    assert len(opened) == len(closed) == 1
    assert closed[0]["remote"] == {"ip": "127.0.0.1", "port": port}
    assert closed[0]["l7_protocol"] == "http1"
    assert closed[0]["bytes_received"] > 0
    assert _of(records, "http", audited.pid) == []
    assert _of(records, "access_log", audited.pid) == []
    (http,) = _of(records, "http", observed.pid)
    assert http["response"]["body"]  # level full for the observed client
    assert len(_of(records, "access_log", observed.pid)) == 1
    # The server is not audited: it records both transactions.
    assert len(_of(records, "http", server.pid)) == 2


def test_ignore_with_an_exe_filter_leaves_the_process_out(e2e: Lab, tmp_path: Path) -> None:
    """The kernel reads no filters (it observes); userspace applies them at the exec."""
    server, port = _server(e2e, tmp_path)
    config = tmp_path / "qtap.yaml"
    config.write_text(AUDIT)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    sensor = e2e.sensor(extra=["--config", str(config)])
    url = f"http://127.0.0.1:{port}/status/200"
    ignored = e2e.spawn(
        [PYTHON, str(script), url, "1"],
        cgroup=e2e.cgroup,
        stem="ignored",
        env={"QPOINT_STRATEGY": "ignore,exe.contains:python"},
    )
    ignored.wait_message("done")
    assert ignored.wait() == 0
    # The server's record of the same transaction: the sensor has seen it all by then.
    sensor.wait_for(
        lambda _r: _of(sensor.all_records(), "http", server.pid), what="the server's record"
    )
    sensor.finish()
    records = sensor.all_records()
    assert [r for r in records if r["process"]["pid"] == ignored.pid] == []
    assert sensor.stats is not None and sensor.stats["environment"]["bad_strategies"] == 0


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own (port 53 on its loopback is ours alone)."""
    name = f"flowtap-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


DNS_OFF = """\
version: 2
tap:
  direction: all
"""


def test_dns_flows_left_out_by_default_in_a_tap_section(
    e2e: Lab, tmp_path: Path, netns: str
) -> None:
    """Qtap's audit_include_dns defaults to false: a file with a tap section and without
    the key records no DNS flows (without a file, test_dns.py shows them recorded)."""
    server, port = _server(e2e, tmp_path)
    config = tmp_path / "qtap.yaml"
    config.write_text(DNS_OFF)
    sensor = e2e.sensor(extra=["--config", str(config)])
    peer = e2e.spawn(
        ["ip", "netns", "exec", netns, PYTHON, str(DNS_PEER)], cgroup=e2e.cgroup, stem="dns"
    )
    for event in ("unconnected", "connected", "nobody"):
        peer.wait_message(event)
    assert peer.wait() == 0
    curl = e2e.spawn(
        [CURL, "-sS", "--noproxy", "*", f"http://127.0.0.1:{port}/status/200"],
        cgroup=e2e.cgroup,
        stem="curl",
    )
    curl.finish()
    sensor.wait_for_closed(pid=curl.pid)
    records = sensor.finish()
    assert {r["socket_protocol"] for r in records} == {"tcp"}
    assert sensor.stats is not None and sensor.stats["dns_records_left_out"] == 6
    assert server.pid in {r["process"]["pid"] for r in records}
