"""Issue 14, item 1: records leave the consumer through one bounded queue per sink. A real
sensor (in this process, so a test sink can be wired in) with two sinks: a JSON-lines file
and a sink that blocks; the file still gets every record, and the blocked sink's losses
are counted exactly."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from flowtap.config import SensorConfig
from flowtap.sensor import Sensor
from flowtap.sinks.base import open_private
from flowtap.sinks.jsonl import JsonLinesSink
from flowtap.sinks.pipeline import Pipeline

from .helpers import RECORD_TIMEOUT_S, STOP_TIMEOUT_S, TIMEOUT_SCALE, Lab, wait_until

CONNECTIONS = 150  # records: an open and a close each
SLOW_QUEUE = 40


class BlockedSink:
    """Blocks in its first write until released, as a destination that stopped reading."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.entered.set()
        self.release.wait(STOP_TIMEOUT_S)  # bounded: the test releases it well before
        self.records.append(record)

    def close(self) -> None:
        pass


def test_a_blocked_sink_does_not_stop_the_other_sink(
    e2e: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flowtap")
    output = tmp_path / "records.jsonl"
    blocked = BlockedSink()
    pipeline = Pipeline(
        [("file", JsonLinesSink(open_private(str(output)), owned=True)), ("blocked", blocked)],
        capacities={"blocked": SLOW_QUEUE},
    )
    config = SensorConfig(
        cgroup=e2e.cgroup.path,
        include_loopback=True,
        output="json",
        egress_state_dir=tmp_path / "state",
        stats_file=tmp_path / "stats.json",
        exec_gate_paths=(Path("/"),),
        exec_hold_ms=int(2000 * TIMEOUT_SCALE),
    )
    sensor = Sensor(config, pipeline)
    stop = threading.Event()
    sensor.start()
    consumer = threading.Thread(target=sensor.run, args=(stop,), name="consumer")
    consumer.start()
    try:
        server = e2e.server(connections=1 + CONNECTIONS, cgroup=False)
        first = e2e.client(server)
        first.finish()
        # The blocked sink holds the first record; from now on its queue fills.
        assert blocked.entered.wait(RECORD_TIMEOUT_S), "no record reached the blocked sink"
        client = e2e.client(server, extra=["--repeat", str(CONNECTIONS)])
        client.finish()
        server.peer.finish()
        total = 2 * (1 + CONNECTIONS)

        def all_written() -> list[dict[str, Any]] | None:
            lines = output.read_text().split("\n")[:-1]
            return [json.loads(line) for line in lines] if len(lines) >= total else None

        # The consumer and the file sink went on while the other sink was blocked.
        written = wait_until(all_written, RECORD_TIMEOUT_S, f"{total} records in the file")
        blocked.release.set()
    finally:
        blocked.release.set()
        stop.set()
        consumer.join(STOP_TIMEOUT_S)
        report = sensor.stop()
    assert not consumer.is_alive()
    assert len(written) == total
    assert sorted(r["process"]["pid"] for r in written) == sorted(
        [first.pid] * 2 + [client.pid] * (2 * CONNECTIONS)
    )
    stats = pipeline.stats()
    # One record in its write, SLOW_QUEUE queued: every other one was lost for it, once.
    lost = total - 1 - SLOW_QUEUE
    assert (stats["blocked"].written, stats["blocked"].dropped) == (1 + SLOW_QUEUE, lost)
    assert [r["connection_id"] for r in blocked.records] == [
        r["connection_id"] for r in written[: 1 + SLOW_QUEUE]
    ]
    assert (stats["file"].written, stats["file"].dropped, stats["file"].errors) == (total, 0, 0)
    assert report["sink_dropped"] == lost
    assert {name: n for name, n in report.items() if n} == {"sink_dropped": lost}, report
    stats_file = json.loads((tmp_path / "stats.json").read_text())
    assert stats_file["sink_dropped"] == {"file": 0, "blocked": lost}
    assert stats_file["records"] == total
    # The exit summary says what the user lost, and where.
    assert f"{lost} records lost for sink blocked" in caplog.text
