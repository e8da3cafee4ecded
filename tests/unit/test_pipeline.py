"""The output pipeline with real sinks and real threads: a FIFO nobody reads blocks its
sink's writes; the other sink still gets every record, and each record of the blocked one
is written, dropped or failed, exactly once."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import termios
import threading
import time
from pathlib import Path

from flowtap.sinks.base import open_private
from flowtap.sinks.jsonl import JsonLinesSink
from flowtap.sinks.pipeline import Pipeline

SCALE = float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))
RECORDS = 2000
CAPACITY = 16


def _records() -> list[dict[str, object]]:
    # ~1 KiB each: the FIFO's 64 KiB buffer holds a few dozen, then writes block.
    return [{"type": "connection", "n": n, "pad": "x" * 1000} for n in range(RECORDS)]


def test_a_fifo_nobody_reads_does_not_stop_the_other_sink(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, never read until the end
    try:
        stuck = JsonLinesSink(open_private(str(fifo)), owned=True)
        good_path = tmp_path / "good.jsonl"
        good = JsonLinesSink(open_private(str(good_path)), owned=True)
        pipeline = Pipeline(
            [("fifo", stuck), ("file", good)], capacity=CAPACITY, flush_s=1.0 * SCALE
        )
        file_worker = pipeline.workers[1]
        for record in _records():
            # The pace of a consumer the file sink keeps up with (bounded wait): the
            # blocked FIFO sink must not slow it down.
            deadline = time.monotonic() + 10 * SCALE
            while file_worker.depth >= CAPACITY and time.monotonic() < deadline:
                time.sleep(0.0005)
            pipeline.submit(record)
        pipeline.close()
        stats = pipeline.stats()
        lines = good_path.read_text().splitlines()
        assert [json.loads(line)["n"] for line in lines] == list(range(RECORDS))
        assert (stats["file"].written, stats["file"].dropped, stats["file"].errors) == (
            RECORDS,
            0,
            0,
        )
        # What reached the FIFO whole is what the blocked sink counts as written; all the
        # rest is counted lost (queue full, or not written when the exit's wait ran out).
        # Exactly what is in the pipe now (FIONREAD): reading frees room, and the write
        # still blocked (given up at exit) would then complete after it.
        pending = struct.unpack("i", fcntl.ioctl(reader, termios.FIONREAD, b"\0" * 4))[0]
        data = b""
        while len(data) < pending:
            data += os.read(reader, pending - len(data))
        whole = data.split(b"\n")[:-1]
        assert stats["fifo"].written == len(whole)
        assert stats["fifo"].errors == 0
        assert stats["fifo"].dropped == RECORDS - len(whole)
        assert stats["fifo"].dropped >= RECORDS - len(whole) - CAPACITY > 0
    finally:
        os.close(reader)


class _FailingSink:
    """Refuses every other record, the way a full disk refuses a write."""

    def __init__(self) -> None:
        self.seen = 0
        self.closed = threading.Event()

    def write(self, record: dict[str, object]) -> None:
        self.seen += 1
        if self.seen % 2 == 0:
            raise RuntimeError("refused")

    def close(self) -> None:
        self.closed.set()


def test_a_failing_sink_is_counted_and_never_stops_the_pipeline() -> None:
    failing = _FailingSink()
    pipeline = Pipeline([("failing", failing)], capacity=RECORDS, flush_s=10.0)
    for record in _records()[:100]:
        pipeline.submit(record)
    pipeline.close()
    stats = pipeline.stats()["failing"]
    assert (stats.written, stats.errors, stats.dropped) == (50, 50, 0)
    assert failing.closed.is_set()
