"""Listeners are per network namespace: two servers on the same port, in two namespaces
the test makes, one inside the traced cgroup and one outside. Connections that are
accepted and closed unused are attributed from the listener table alone, so each must
find its own namespace's listener."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import PYTHON, Lab, Peer, only_pair

pytestmark = pytest.mark.e2e

PORT = 8099
# Listens on PORT, says so, accepts one connection and closes it without reading.
SERVER = r"""
import json, os, signal, socket, sys
signal.alarm(round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print(json.dumps({"event": "listening", "pid": os.getpid()}), flush=True)
conn, peer = listener.accept()
conn.close()
print(json.dumps({"event": "closed", "pid": os.getpid(), "peer_port": peer[1]}), flush=True)
"""
# Connects to PORT and waits for the server to close the connection, sending nothing.
CLIENT = r"""
import json, os, signal, socket, sys
signal.alarm(round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(json.dumps({"event": "connected", "pid": os.getpid(),
                  "local_port": sock.getsockname()[1]}), flush=True)
sock.recv(1)
sock.close()
"""


@pytest.fixture
def two_netns() -> Iterator[tuple[str, str]]:
    names = (f"flowtap-test-{secrets.token_hex(4)}", f"flowtap-test-{secrets.token_hex(4)}")
    made: list[str] = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_same_port_in_two_namespaces(e2e: Lab, tmp_path: Path, two_netns: tuple[str, str]) -> None:
    traced_ns, other_ns = two_netns
    server_py = tmp_path / "server.py"
    server_py.write_text(SERVER)
    client_py = tmp_path / "client.py"
    client_py.write_text(CLIENT)
    sensor = e2e.sensor(extra=["--direction", "ingress"])

    def in_ns(ns: str, script: Path, *, traced: bool, stem: str) -> Peer:
        argv = ["ip", "netns", "exec", ns, PYTHON, str(script), str(PORT)]
        return e2e.spawn(argv, cgroup=e2e.cgroup if traced else None, stem=stem)

    traced_server = in_ns(traced_ns, server_py, traced=True, stem="server-traced")
    other_server = in_ns(other_ns, server_py, traced=False, stem="server-other")
    traced_pid = int(traced_server.wait_message("listening")["pid"])
    other_server.wait_message("listening")
    # The other namespace's listen() comes last: with a port-only key it would win.
    for ns, server in ((traced_ns, traced_server), (other_ns, other_server)):
        client = in_ns(ns, client_py, traced=False, stem="client")
        client.wait_message("connected")
        server.wait_message("closed")
        client.finish()
    closed = traced_server.wait_message("closed")
    sensor.wait_for_closed(pid=traced_pid, direction="ingress")
    records = sensor.finish()

    opened, close = only_pair(records, pid=traced_pid, direction="ingress")
    assert opened["local"] == {"ip": "127.0.0.1", "port": PORT}
    assert opened["remote"]["port"] == closed["peer_port"]
    assert (close["bytes_sent"], close["bytes_received"]) == (0, 0)
    assert {r["process"]["pid"] for r in records} == {traced_pid}
