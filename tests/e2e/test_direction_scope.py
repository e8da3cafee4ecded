"""--direction egress-internal / egress-external, decided in the kernel by the peer's
address: a private test host and a loopback server are internal, a test host address in
TEST-NET-3 (203.0.113.0/24) is external."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import PYTHON, Lab, Record, Sensor
from .netns import TestHost, make_test_host

pytestmark = pytest.mark.e2e

# Accepts connections on every address and answers each with "ok".
SERVER = r"""
import json, os, signal, socket, sys
signal.alarm(round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))
server = socket.create_server((sys.argv[1], 0))
print(json.dumps({"event": "listening", "pid": os.getpid(), "port": server.getsockname()[1]}),
      flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(b"ok")
    conn.close()
"""

# Connects to each (address, port) in turn and reads the answer.
CLIENT = r"""
import os, signal, socket, sys
signal.alarm(round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))
for target in sys.argv[1:]:
    address, port = target.rsplit(":", 1)
    with socket.create_connection((address, int(port))) as conn:
        assert conn.recv(2) == b"ok"
"""


@pytest.fixture
def host() -> Iterator[tuple[TestHost, str]]:
    """A test host with a second, public-looking address (TEST-NET-3), routed to it."""
    with make_test_host() as made:
        external = f"203.0.113.{secrets.randbelow(250) + 2}"
        outside = _outside_link(made)
        subprocess.run(made.command(["ip", "addr", "add", f"{external}/32", "dev", "lo"]),
                       check=True, capture_output=True)  # fmt: skip
        # The route goes with the veth when the test host is removed.
        subprocess.run(["ip", "route", "add", f"{external}/32", "via", made.address,
                        "dev", outside], check=True, capture_output=True)  # fmt: skip
        yield made, external


def _outside_link(made: TestHost) -> str:
    out = subprocess.run(["ip", "-o", "addr", "show", "to", f"{made.gateway}/32"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return out.split()[1]


def test_internal_and_external_peers(e2e: Lab, tmp_path: Path, host: tuple[TestHost, str]) -> None:
    test_host, external = host
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    remote = e2e.spawn(test_host.command([PYTHON, str(script), "0.0.0.0"]), cgroup=None,
                       stem="remote-server")  # fmt: skip
    remote_port = int(remote.wait_message("listening")["port"])
    local = e2e.spawn([PYTHON, str(script), "127.0.0.1"], cgroup=None, stem="local-server")
    local_port = int(local.wait_message("listening")["port"])
    internal = e2e.sensor(extra=["--direction", "egress-internal"])
    external_only = e2e.sensor(extra=["--direction", "egress-external"])

    client_script = tmp_path / "client.py"
    client_script.write_text(CLIENT)
    targets = {
        "private": (test_host.address, remote_port),
        "loopback": ("127.0.0.1", local_port),
        "public": (external, remote_port),
    }
    client = e2e.spawn(
        [PYTHON, str(client_script), *(f"{a}:{p}" for a, p in targets.values())],
        cgroup=e2e.cgroup,
        stem="client",
    )
    client.finish()

    def remotes(sensor: Sensor, count: int) -> list[tuple[str, int]]:
        def closed(records: list[Record]) -> list[tuple[str, int]] | None:
            mine = [
                r for r in records if r["process"]["pid"] == client.pid and r["event"] == "close"
            ]
            if len(mine) < count:
                return None
            return [(r["remote"]["ip"], r["remote"]["port"]) for r in mine]

        return sensor.wait_for(closed, what=f"{count} closed connections")

    assert sorted(remotes(internal, 2)) == sorted([targets["private"], targets["loopback"]])
    assert remotes(external_only, 1) == [targets["public"]]
    internal.finish()
    external_only.finish()
    # Nothing more arrived after the waits: exactly those connections, in each sensor.
    for sensor, expected in ((internal, 2), (external_only, 1)):
        mine = [r for r in sensor.records() if r["process"]["pid"] == client.pid]
        assert sorted(r["event"] for r in mine) == ["close"] * expected + ["open"] * expected
