"""Program start (docs/program-start.md): clients started after the sensor is ready, and
talking at once, are captured from their first request, because the exec gate holds each
exec of a never-seen file until it is classified and probed. Each run uses a fresh copy
of the executable (a new inode, as after a deploy).

Shared machine: the gate marks only a tmpfs this test mounts (--exec-gate-path), so no
other program on the host is ever held by it, even while a test stops the sensor; the
sensor is scoped to the test cgroup; traffic is loopback only.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import CURL, EXEC_HOLD, Lab, Peer, Record, Sensor, find_pairs, only_pair, start_server
from .test_go_tls import go_peers  # noqa: F401 (the fixture: tlspeer built twice)

pytestmark = pytest.mark.e2e

NODE = "/usr/bin/node"
TRUE = "/bin/true"
TOUCH = "/usr/bin/touch"
RUNS = 3


@pytest.fixture
def gate_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of the test's own: the only filesystem the sensor's gate marks."""
    point = tmp_path / "gate-fs"
    point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "flowtap-test", str(point)],
        check=True,
        timeout=10,
    )
    try:
        yield point
    finally:
        done = subprocess.run(["umount", str(point)], capture_output=True, timeout=10)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=10)


# The deadline for the capture tests. The default (300 ms) holds about 95-150 ms at p50
# here (docs/program-start.md); but this machine is shared by five engineers on two
# cores, and at a load average of 14 a Go client's 33 uprobe attaches took over 300 ms.
# What happens past a deadline is test_hold_ends_at_the_deadline's subject.
CAPTURE_HOLD = EXEC_HOLD
# A fresh Go copy brings 33 uprobe links, and each takes ~100 ms to destroy at stop.
SLOW_STOP_S = 60.0


def gate_sensor(e2e: Lab, gate_fs: Path, *extra: str) -> Sensor:
    sensor = e2e.sensor(extra=["--exec-gate-path", str(gate_fs), "--capture-level", "full", *extra])
    sensor.wait_log("exec gate on")
    return sensor


def fresh_copy(source: str, directory: Path, name: str) -> Path:
    """A new file (a new inode) with source's bytes."""
    target = directory / name
    shutil.copy2(source, target)
    os.utime(target)  # a new mtime too: a new identity whatever the inode
    return target


def records_of(sensor: Sensor, pid: int, count: int) -> list[Record]:
    def enough(_records: list[Record]) -> list[Record] | None:
        mine = [r for r in sensor.http_records() if r["process"]["pid"] == pid]
        return mine if len(mine) >= count else None

    return sensor.wait_for(enough, what=f"{count} http records of pid {pid}")


def opened_connection(sensor: Sensor, pid: int, port: int) -> Record:
    """The open record of pid's one connection to port (its close may come later)."""

    def opened(records: list[Record]) -> Record | None:
        pairs = find_pairs(records, pid=pid, remote_port=port)
        assert len(pairs) <= 1, pairs
        return pairs[0][0] if pairs else None

    return sensor.wait_for(opened, what=f"the connection of pid {pid}")


def body(message: dict[str, Any]) -> bytes:
    return base64.b64decode(message.get("body") or "")


def gate_stats(sensor: Sensor) -> dict[str, Any]:
    assert sensor.stats is not None
    gate: dict[str, Any] = sensor.stats["exec_gate"]
    return gate


# --- captured from the first request ----------------------------------------------------


@pytest.mark.parametrize("build", ["symbols", "stripped"])
def test_go_client_first_request(
    e2e: Lab,
    pki: dict[str, Path],
    go_peers: dict[str, Path],  # noqa: F811
    gate_fs: Path,
    build: str,
) -> None:
    _server, port = start_server(e2e, pki)
    sensor = gate_sensor(e2e, gate_fs, "--direction", "egress", *CAPTURE_HOLD)
    url = f"https://127.0.0.1:{port}/items/33"
    clients: list[Peer] = []
    for run in range(RUNS):
        binary = fresh_copy(str(go_peers[build]), gate_fs, f"go-{build}-{run}")
        go = e2e.file("go")
        go.touch()  # the client does not wait: it talks at once
        client = e2e.spawn(
            [str(binary), "client", str(pki["ca"]), url, "2", "h1", str(go)],
            cgroup=e2e.cgroup,
            stem="go-client",
        )
        client.finish()
        clients.append(client)
        records_of(sensor, client.pid, 2)
    connections = sensor.finish(SLOW_STOP_S)
    for client in clients:
        records = [r for r in sensor.http_records() if r["process"]["pid"] == client.pid]
        opened, _closed = only_pair(connections, pid=client.pid, remote_port=port)
        assert len(records) == 2, records
        for record in records:
            assert record["capture_source"] == "gotls"
            assert record["connection_id"] == opened["connection_id"]
            assert record["request"]["path"] == "/items/33"
            assert record["response"]["status"] == 200
            assert body(record["response"]) == bytes(range(33))
    gate = gate_stats(sensor)
    assert gate["held"] >= RUNS and gate["expired"] == 0, gate


_NODE_GET = """
const https = require("https"), fs = require("fs");
https.get(process.argv[1], {ca: fs.readFileSync(process.argv[2])}, (res) => {
  const parts = [];
  res.on("data", (d) => parts.push(d));
  res.on("end", () => console.log(JSON.stringify({event: "done", pid: process.pid,
    status: res.statusCode, length: Buffer.concat(parts).length})));
});
"""


def test_node_https_get_first_request(e2e: Lab, pki: dict[str, Path], gate_fs: Path) -> None:
    if not Path(NODE).exists():
        pytest.skip("node is not installed")
    _server, port = start_server(e2e, pki)
    sensor = gate_sensor(e2e, gate_fs, "--direction", "egress", *CAPTURE_HOLD)
    url = f"https://127.0.0.1:{port}/items/9"
    for run in range(RUNS):
        binary = fresh_copy(NODE, gate_fs, f"node-{run}")
        client = e2e.spawn(
            [str(binary), "-e", _NODE_GET, url, str(pki["ca"])],
            cgroup=e2e.cgroup,
            stem="node",
        )
        done = client.wait_message("done")
        client.finish()
        assert (done["status"], done["length"]) == (200, 9)
        (record,) = records_of(sensor, client.pid, 1)
        opened = opened_connection(sensor, client.pid, port)
        assert record["capture_source"] == "openssl"
        assert record["connection_id"] == opened["connection_id"]
        assert (record["request"]["method"], record["request"]["path"]) == ("GET", "/items/9")
        assert record["response"]["status"] == 200
        assert body(record["response"]) == bytes(range(9))
        binary.unlink()  # the tmpfs holds a few copies of a 99 MB file at most
    sensor.finish(SLOW_STOP_S)
    gate = gate_stats(sensor)
    assert gate["held"] >= RUNS and gate["expired"] == 0, gate


def private_root(directory: Path, ca: Path) -> Path:
    """A root holding its own copies of curl, its libraries (libssl among them), the
    dynamic linker and the CA: nothing in it is a file the sensor has seen."""
    directory.mkdir()
    listed = subprocess.run(["ldd", CURL], capture_output=True, text=True, check=True).stdout
    files = [CURL]
    for line in listed.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            files.append(path)
    for source in files:
        target = directory / source.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(source), target)
    shutil.copy(ca, directory / "ca.pem")
    return directory


def test_curl_in_private_root_first_request(e2e: Lab, pki: dict[str, Path], gate_fs: Path) -> None:
    _server, port = start_server(e2e, pki)
    sensor = gate_sensor(e2e, gate_fs, "--direction", "egress", *CAPTURE_HOLD)
    for run in range(RUNS):
        root = private_root(gate_fs / f"root-{run}", pki["ca"])
        path = f"/items/{run + 3}"
        argv = ["unshare", "-m", "chroot", str(root), CURL, "-sS", "--http1.1"]
        client = e2e.spawn(
            [*argv, "--cacert", "/ca.pem", f"https://127.0.0.1:{port}{path}"],
            cgroup=e2e.cgroup,
            stem="curl-root",
        )
        client.finish()
        (record,) = records_of(sensor, client.pid, 1)
        opened = opened_connection(sensor, client.pid, port)
        assert record["capture_source"] == "openssl"
        assert record["connection_id"] == opened["connection_id"]
        assert record["request"]["path"] == path
        assert record["response"]["status"] == 200
        assert body(record["response"]) == bytes(range(run + 3))
    sensor.finish()
    # The root's own libssl, found in it before curl ran.
    assert "probes attached to /lib/x86_64-linux-gnu/libssl.so.3 (root of pid" in sensor.stderr()


# --- the hold's bounds ------------------------------------------------------------------


def timed_run(e2e: Lab, argv: list[str], timeout: float = 20.0) -> float:
    """Runs argv in the test cgroup to a successful end; its wall time in seconds."""
    started = time.monotonic()
    e2e.spawn(argv, cgroup=e2e.cgroup, stem="exec").finish(timeout)
    return time.monotonic() - started


def spawn_held(e2e: Lab, program: Path, marker: Path) -> Peer:
    """`program marker` through a shell's exec: Popen returns once the shell runs (it
    waits for its child's exec, which the gate may hold)."""
    argv = ["/bin/sh", "-c", 'exec "$0" "$@"', str(program), str(marker)]
    return e2e.spawn(argv, cgroup=e2e.cgroup, stem="held")


def test_hold_ends_at_the_deadline(e2e: Lab, gate_fs: Path) -> None:
    """Classification made slow on purpose (3 s, a test-only setting): the exec still
    goes on at the 200 ms deadline, and the late classification is counted."""
    sensor = gate_sensor(e2e, gate_fs, "--exec-hold-ms", "200", "--exec-gate-test-delay-ms", "3000")
    took = timed_run(e2e, [str(fresh_copy(TRUE, gate_fs, "true-slow"))])
    assert took < 1.5, f"held {took:.2f} s past a 200 ms deadline"
    sensor.wait_log("allowed at the 200 ms deadline")
    time.sleep(3.2)  # the slow classification ends; then it is counted as late
    sensor.finish()
    gate = gate_stats(sensor)
    assert gate["expired"] == 1 and gate["finished_late"] == 1, gate


def test_kill_9_releases_a_held_exec(e2e: Lab, gate_fs: Path) -> None:
    """A sensor killed while it holds an exec: the kernel allows it when the fanotify
    descriptor closes with the process."""
    sensor = gate_sensor(
        e2e, gate_fs, "--exec-hold-ms", "60000", "--exec-gate-test-delay-ms", "60000"
    )
    marker = e2e.file("ran")
    held = spawn_held(e2e, fresh_copy(TOUCH, gate_fs, "touch-held"), marker)
    time.sleep(1.0)
    assert not marker.exists() and held.popen.poll() is None, "the exec was not held"
    sensor.kill()
    started = time.monotonic()
    held.finish(5.0)
    assert marker.exists()
    assert time.monotonic() - started < 2.0


def test_stopped_sensor_holds_only_never_seen_files(e2e: Lab, gate_fs: Path) -> None:
    """SIGSTOP: a file classified before runs at once (its ignore mark is in the kernel),
    a never-seen one waits until the sensor goes on."""
    sensor = gate_sensor(e2e, gate_fs)
    known = fresh_copy(TOUCH, gate_fs, "touch-known")
    timed_run(e2e, [str(known), str(e2e.file("first"))])
    never_seen = fresh_copy(TOUCH, gate_fs, "touch-new")
    marker = e2e.file("ran")
    os.kill(sensor.pid, signal.SIGSTOP)
    try:
        took = timed_run(e2e, [str(known), str(e2e.file("second"))], timeout=5.0)
        assert took < 1.0, f"a known file waited {took:.2f} s on a stopped sensor"
        held = spawn_held(e2e, never_seen, marker)
        time.sleep(0.8)
        assert not marker.exists() and held.popen.poll() is None, "never-seen file not held"
    finally:
        os.kill(sensor.pid, signal.SIGCONT)
    held.finish(5.0)
    assert marker.exists()
    sensor.finish()


# --- without the gate -------------------------------------------------------------------


def test_gate_off_probes_the_next_run(
    e2e: Lab,
    pki: dict[str, Path],
    go_peers: dict[str, Path],  # noqa: F811
    gate_fs: Path,
) -> None:
    """--exec-gate off: the file named in the exec event is classified even though its
    process exited at once, so the next run of the same file is captured whole."""
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--exec-gate", "off", "--capture-level", "full"])
    binary = fresh_copy(str(go_peers["stripped"]), gate_fs, "go-off")
    url = f"https://127.0.0.1:{port}/items/5"
    go = e2e.file("go")
    go.touch()
    argv = [str(binary), "client", str(pki["ca"]), url, "1", "h1", str(go)]
    e2e.spawn(argv, cgroup=e2e.cgroup, stem="go-first").finish()
    # The point of the test: the fallback classifies the file after its first run, and
    # the next run, once that is done, is captured whole.
    sensor.wait_log(f"go tls probes attached to {binary}")
    second = e2e.spawn(argv, cgroup=e2e.cgroup, stem="go-second")
    second.finish()
    (record,) = records_of(sensor, second.pid, 1)
    assert record["request"]["path"] == "/items/5"
    assert body(record["response"]) == bytes(range(5))
    # Not finish(): the first run may be probed while it runs, and a call caught halfway
    # is counted as tls_unattributed; only the second run's capture is asserted.
    sensor.stop()
    assert gate_stats(sensor)["unavailable"] == "--exec-gate off"


def test_restart_remembers_classes(e2e: Lab, gate_fs: Path, tmp_path: Path) -> None:
    """The classes persist under --state-dir: a restarted sensor restores the ignore
    marks of files known to need nothing, and neither holds nor reads them again."""
    state = tmp_path / "state"
    program = fresh_copy(TRUE, gate_fs, "true-known")
    first = gate_sensor(e2e, gate_fs, "--state-dir", str(state))
    timed_run(e2e, [str(program)])
    first.finish()
    assert gate_stats(first)["held"] == 1
    saved = state / "exec-classes.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert str(program) in saved.read_text()

    second = gate_sensor(e2e, gate_fs, "--state-dir", str(state))
    timed_run(e2e, [str(program)])
    second.finish()
    gate = gate_stats(second)
    assert gate["marks_restored"] >= 1 and gate["held"] == 0, gate
