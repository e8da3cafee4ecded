"""Issue 14, event store `file`: --output-file rotated by size. A real `flowtap run` with
a small --output-max-bytes while a client makes connections: the exact number of files
the records' sizes call for, every line whole JSON in one file, none lost, each file
owner-only."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from .helpers import RECORD_TIMEOUT_S, Lab, wait_until

pytestmark = pytest.mark.e2e

CONNECTIONS = 60
MAX_BYTES = 4096


def chain(output: Path) -> list[Path]:
    """The output's files, oldest first: FILE.N ... FILE.1, FILE."""
    rotated = sorted(
        (p for p in output.parent.glob(output.name + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
        reverse=True,
    )
    return [*rotated, output]


def expected_files(lengths: list[int]) -> int:
    """sinks/rotating.py's rule: a record that would take a non-empty file past the limit
    starts a new one."""
    files, size = 1, 0
    for length in lengths:
        if size and size + length > MAX_BYTES:
            files, size = files + 1, 0
        size += length
    return files


def test_rotation_by_size_loses_and_splits_nothing(e2e: Lab) -> None:
    sensor = e2e.sensor(extra=["--output-max-bytes", str(MAX_BYTES), "--output-keep", "1000"])
    server = e2e.server(connections=CONNECTIONS, cgroup=False)
    client = e2e.client(server, extra=["--repeat", str(CONNECTIONS)])
    client.finish()
    server.peer.finish()

    def lines() -> list[bytes]:
        return [line for p in chain(sensor.output) for line in p.read_bytes().splitlines(True)]

    def all_closed() -> bool:
        records = [json.loads(line) for line in lines() if line.endswith(b"\n")]
        closes: int = sum(r.get("event") == "close" for r in records)
        return closes >= CONNECTIONS

    wait_until(all_closed, RECORD_TIMEOUT_S, f"{CONNECTIONS} close records in the files")
    report = sensor.stop()
    files = chain(sensor.output)
    raw = lines()
    records = [json.loads(line) for line in raw]  # every line is whole JSON
    assert all(line.endswith(b"\n") for line in raw)
    assert len(files) == expected_files([len(line) for line in raw]) > 3
    for path in files:
        assert path.stat().st_size <= MAX_BYTES
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # None lost: the client's connections each have their open and close, once.
    mine = [r for r in records if r["process"]["pid"] == client.pid]
    assert len(mine) == 2 * CONNECTIONS
    assert len(mine) == len(records)  # only the client is in the sensor's cgroup
    ids = {r["connection_id"] for r in mine}
    assert len(ids) == CONNECTIONS
    assert sorted((r["connection_id"], r["event"]) for r in mine) == sorted(
        (i, event) for i in ids for event in ("open", "close")
    )
    assert report["sinks"]["file"] == {"written": len(records), "errors": 0, "dropped": 0}
