"""A pre-forked server: the parent listens, a child it forked accepts and serves.

`--pid` on the child must report the connections it serves, although the process that
called listen() (the parent) is outside the filter.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import PYTHON, Lab, find_pairs, only_pair

pytestmark = pytest.mark.e2e

PREFORK_SERVER = r"""
import json, os, signal, socket, sys, time
signal.alarm(round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))
listener = socket.create_server(("127.0.0.1", 0))
go = sys.argv[1]
worker = os.fork()
if worker == 0:
    while not os.path.exists(go):
        time.sleep(0.01)
    conn, peer = listener.accept()
    data = b""
    while len(data) < 10:
        data += conn.recv(10 - len(data))
    conn.sendall(b"y" * 20)
    conn.close()
    print(json.dumps({"event": "served", "pid": os.getpid(), "peer_port": peer[1]}), flush=True)
    os._exit(0)
port = listener.getsockname()[1]
print(json.dumps({"event": "listening", "pid": os.getpid(), "port": port, "worker": worker}),
      flush=True)
os.waitpid(worker, 0)
"""


def test_pid_on_a_worker_sees_the_connections_it_serves(e2e: Lab, tmp_path: Path) -> None:
    script = tmp_path / "prefork.py"
    script.write_text(PREFORK_SERVER)
    go = e2e.file("go")
    server = e2e.spawn([PYTHON, str(script), str(go)], cgroup=e2e.cgroup, stem="prefork")
    listening = server.wait_message("listening")
    worker = int(listening["worker"])
    sensor = e2e.sensor("--pid", str(worker))
    go.touch()
    client = e2e.client(port=int(listening["port"]), send=10, expect=20, cgroup=False)
    client.finish()
    served = server.wait_message("served", pid=worker)
    sensor.wait_for_closed(pid=worker, direction="ingress")
    server.finish()
    records = sensor.finish()

    opened, closed = only_pair(records, pid=worker, direction="ingress")
    assert opened["process"]["tid"] == worker
    assert opened["remote"]["port"] == served["peer_port"]
    assert (closed["bytes_received"], closed["bytes_sent"]) == (10, 20)
    assert not find_pairs(records, direction="egress")  # the client is outside --pid
    assert {r["process"]["pid"] for r in records} == {worker}
