"""Per-transaction capture levels from a Qtap configuration file's http_capture rules."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from .helpers import CURL, PYTHON, Lab, flowtap_command

pytestmark = pytest.mark.e2e

# GET /status/N answers status N with the body "body-N".
SERVER = r"""
import json, os, signal
from http.server import BaseHTTPRequestHandler, HTTPServer
signal.alarm(round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_GET(self):
        status = int(self.path.rsplit("/", 1)[1])
        body = f"body-{status}".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = HTTPServer(("127.0.0.1", 0), Handler)
print(json.dumps({"event": "listening", "pid": os.getpid(), "port": server.server_port}),
      flush=True)
server.serve_forever()
"""

CONFIG = """\
version: 2
rulekit:
  macros:
    - name: failed
      expr: http.res.status >= 500
stacks:
  default_stack:
    plugins:
      - type: http_capture
        config:
          level: summary
          rules:
            - name: not the server
              expr: src.process.path == "{python}"
              level: none
  errors_stack:
    plugins:
      - type: http_capture
        config:
          level: summary
          rules:
            - name: errors of one host
              expr: failed()
              level: full
tap:
  http:
    stack: default_stack
  endpoints:
    - domain: errors.test
      http:
        stack: errors_stack
"""


def test_each_transaction_gets_the_level_its_rule_says(e2e: Lab, tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = e2e.spawn([PYTHON, str(script)], cgroup=e2e.cgroup, stem="status-server")
    port = int(server.wait_message("listening")["port"])
    config = tmp_path / "qtap.yaml"
    python = str(Path(f"/proc/{server.pid}/exe").resolve())
    config.write_text(CONFIG.format(python=python))
    sensor = e2e.sensor(extra=["--config", str(config)])

    asked = [("errors.test", 503), ("errors.test", 200), ("other.test", 503)]
    pids: dict[int, tuple[str, int]] = {}
    for host, status in asked:  # each curl starts after the sensor and speaks at once
        url = f"http://127.0.0.1:{port}/status/{status}"
        curl = e2e.spawn(
            [CURL, "-sS", "--noproxy", "*", "-H", f"Host: {host}", url],
            cgroup=e2e.cgroup,
            stem="curl",
        )
        curl.finish()
        pids[curl.pid] = (host, status)
    sensor.wait_for(
        lambda _r: len([r for r in sensor.http_records() if r["process"]["pid"] in pids]) >= 3,
        what="three http records of curl",
    )
    sensor.finish()
    records = sensor.http_records()

    by_request = {pids[r["process"]["pid"]]: r for r in records if r["process"]["pid"] in pids}
    assert sorted(by_request) == sorted(asked)
    full = by_request[("errors.test", 503)]
    assert full["response"]["status"] == 503
    assert base64.b64decode(full["response"]["body"]) == b"body-503"
    assert ["content-type", "text/plain"] in [
        [name.lower(), value] for name, value in full["response"]["headers"]
    ]
    for key in (("errors.test", 200), ("other.test", 503)):
        summary = by_request[key]
        assert summary["response"]["status"] == key[1]
        assert summary["request"]["path"] == f"/status/{key[1]}"
        assert "headers" not in summary["request"] and "headers" not in summary["response"]
        assert "body" not in summary["response"]
    # The server's side: errors.test transactions use that endpoint's stack (no rule against
    # the server there): the 503 in full, the 200 in summary; other.test matched "not the
    # server" in the default stack.
    served = {r["response"]["status"]: r for r in records if r["process"]["pid"] == server.pid}
    assert sorted(served) == [200, 503]
    assert all(r["direction"] == "ingress" for r in served.values())
    assert base64.b64decode(served[503]["response"]["body"]) == b"body-503"
    assert "body" not in served[200]["response"] and "headers" not in served[200]["response"]
    stats = json.loads(sensor.stats_file.read_text())
    assert stats["capture_rules"] == {"errors of one host": 2, "not the server": 1}


SUMMARY_ONLY = """\
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
"""

ERRORS_IN_FULL = """\
version: 2
stacks:
  s:
    plugins:
      - type: http_capture
        config:
          level: headers
          rules:
            - name: errors in full
              expr: http.res.status >= 500
              level: full
tap:
  http:
    stack: s
"""


def _replace(path: Path, text: str) -> None:
    """As editors and config management do: a new file renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.rename(path)


def test_reload_switches_levels_and_a_broken_file_keeps_the_last_good_one(
    e2e: Lab, tmp_path: Path
) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = e2e.spawn([PYTHON, str(script)], cgroup=e2e.cgroup, stem="status-server")
    port = int(server.wait_message("listening")["port"])
    config = tmp_path / "qtap.yaml"
    config.write_text(SUMMARY_ONLY)
    sensor = e2e.sensor(extra=["--config", str(config)])
    curls: list[int] = []

    def curl(status: int) -> None:
        url = f"http://127.0.0.1:{port}/status/{status}"
        peer = e2e.spawn([CURL, "-sS", "--noproxy", "*", url], cgroup=e2e.cgroup, stem="curl")
        peer.finish()
        curls.append(peer.pid)
        sensor.wait_for(
            lambda _r: any(r["process"]["pid"] == peer.pid for r in sensor.http_records()),
            what=f"the http record of curl {peer.pid}",
        )

    curl(503)  # summary
    _replace(config, ERRORS_IN_FULL)  # no signal: the sensor sees the file change
    sensor.wait_log("reloaded (the file changed)")
    curl(503)  # full
    curl(200)  # headers
    _replace(config, ERRORS_IN_FULL.replace("level: full", "level: fulll"))
    state_dir = Path(sensor.argv[sensor.argv.index("--state-dir") + 1])
    reload = subprocess.run(
        [flowtap_command(), "reload-config", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert reload.returncode == 0, reload.stderr
    assert reload.stdout == (
        f"asked flowtap (pid {sensor.pid}) to reload its configuration; its log says the outcome\n"
    )
    sensor.wait_log("not reloaded (SIGHUP)")
    assert "'fulll' is not one of details, full, headers, none, summary" in sensor.stderr()
    curl(503)  # still full: the broken file changed nothing
    sensor.finish()

    mine = {r["process"]["pid"]: r for r in sensor.http_records() if r["process"]["pid"] in curls}
    assert len(mine) == 4  # no transaction lost across the reloads
    levels = []
    for pid in curls:
        response = mine[pid]["response"]
        levels.append(
            "full" if "body" in response else "headers" if "headers" in response else "summary"
        )
    assert levels == ["summary", "full", "headers", "full"]
    assert [mine[pid]["response"]["status"] for pid in curls] == [503, 503, 200, 503]
    stats = json.loads(sensor.stats_file.read_text())
    assert stats["configuration"] == {"reloads": 1, "reloads_refused": 1}
    assert not (state_dir / "sensor.pid").exists()  # removed at exit


FILTERED = """\
version: 2
tap:
  filters:
    custom:
      - exe: {curl}
        strategy: exact
"""

PYTHON_CLIENT = r"""
import http.client, os, signal, sys
signal.alarm(round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
conn.request("GET", "/status/202")
conn.getresponse().read()
conn.close()
"""


def test_a_filtered_executable_gets_no_records(e2e: Lab, tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = e2e.spawn([PYTHON, str(script)], cgroup=e2e.cgroup, stem="status-server")
    port = int(server.wait_message("listening")["port"])
    config = tmp_path / "qtap.yaml"
    config.write_text(FILTERED.format(curl=CURL))
    sensor = e2e.sensor(extra=["--config", str(config)])

    url = f"http://127.0.0.1:{port}/status/200"
    curl = e2e.spawn([CURL, "-sS", "--noproxy", "*", url], cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    client_script = tmp_path / "client.py"
    client_script.write_text(PYTHON_CLIENT)
    client = e2e.spawn([PYTHON, str(client_script), str(port)], cgroup=e2e.cgroup, stem="py")
    client.finish()
    sensor.wait_for(
        lambda _r: any(r["process"]["pid"] == client.pid for r in sensor.http_records()),
        what="the python client's http record",
    )
    sensor.finish()
    everything = sensor.all_records()
    assert [r for r in everything if r.get("process", {}).get("pid") == curl.pid] == []
    mine = [r for r in everything if r.get("process", {}).get("pid") == client.pid]
    http = [r for r in mine if r["type"] == "http"]
    assert [(r["request"]["path"], r["response"]["status"]) for r in http] == [("/status/202", 202)]
    assert [r["event"] for r in mine if r["type"] == "connection"] == ["open", "close"]
    # The server still records both transactions (it is not filtered): curl's and python's.
    served = [r for r in everything if r["type"] == "http" and r["process"]["pid"] == server.pid]
    assert sorted(r["response"]["status"] for r in served) == [200, 202]
