"""sinks/child.py: a sink in a child process. Records arrive whole and in order, what the
child's sink refuses or its queue cannot take is counted in the parent's stats exactly,
a start error keeps its class and message, and the child dies with its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowtap.sinks.child import ChildGoneError, in_child
from flowtap.sinks.pipeline import Pipeline

TESTS = str(Path(__file__).resolve().parents[1] / "unit")


@pytest.fixture(autouse=True)
def _child_imports_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", TESTS)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_record_arrives_in_order(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    sink = in_child("file", "child_sinks", "LinesSink", str(out))
    pipeline = Pipeline([("file", sink)], capacity=5000)
    for n in range(3000):
        pipeline.submit({"type": "connection", "n": n, "text": "é" * (n % 7)})
    pipeline.close()
    assert [r["n"] for r in lines(out)] == list(range(3000))
    stats = pipeline.stats()["file"]
    assert (stats.written, stats.errors, stats.dropped) == (3000, 0, 0)
    assert sink._process.poll() == 0  # the child ended by itself at close


def test_refused_records_are_errors_in_the_parent(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    pipeline = Pipeline([("file", in_child("file", "child_sinks", "LinesSink", str(out)))])
    for n in range(100):
        pipeline.submit({"n": n, "fail": n % 10 == 3})
    pipeline.close()
    assert len(lines(out)) == 90
    stats = pipeline.stats()["file"]
    assert (stats.written, stats.errors, stats.dropped) == (90, 10, 0)


def test_what_the_childs_queue_cannot_take_is_dropped(tmp_path: Path) -> None:
    """The child's sink waits for a gate; its queue holds 5: of 50 records sent at once,
    the one being written and 5 queued are written once the gate opens, 44 are dropped."""
    out, gate = tmp_path / "out.jsonl", tmp_path / "gate"
    sink = in_child("slow", "child_sinks", "LinesSink", str(out), str(gate), capacity=5)
    pipeline = Pipeline([("slow", sink)])
    pipeline.submit({"n": 0})
    deadline = time.monotonic() + 10
    while not (tmp_path / "gate.waiting").exists():  # the child's sink took record 0
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sink.write_batch([{"n": n} for n in range(1, 50)])
    deadline = time.monotonic() + 10
    while sink._seen[2] != 44:
        assert time.monotonic() < deadline, sink._seen
        time.sleep(0.01)
    gate.touch()
    pipeline.close()
    assert [r["n"] for r in lines(out)] == list(range(6))
    stats = pipeline.stats()["slow"]
    # The parent's worker counted record 0 written; write_batch bypassed it (49 more sent).
    assert (stats.errors, stats.dropped) == (0, 44)
    assert stats.written == 1 - 44


def test_a_start_error_keeps_its_class_and_message() -> None:
    with pytest.raises(ValueError, match=r"^the setting x is wrong; give another$"):
        in_child("bad", "child_sinks", "refuses", "x")


def test_a_dead_child_costs_its_records_counted(tmp_path: Path) -> None:
    out, gate = tmp_path / "out.jsonl", tmp_path / "gate"
    sink = in_child("file", "child_sinks", "LinesSink", str(out), str(gate))
    pipeline = Pipeline([("file", sink)])
    for n in range(10):
        pipeline.submit({"n": n})
    deadline = time.monotonic() + 10
    while sink.sent != 10:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(sink.pid, signal.SIGKILL)
    while not sink._done.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(ChildGoneError):
        sink.write_batch([{"n": 10}])
    for n in range(11, 15):
        pipeline.submit({"n": n})
    pipeline.close()
    stats = pipeline.stats()["file"]
    # None was written (the gate never opened): 10 lost in the child, 4 refused after.
    assert (stats.written, stats.errors, stats.dropped) == (0, 4, 10)


PARENT = """
import sys, time
sys.path.insert(0, {tests!r})
from flowtap.sinks.child import in_child
sink = in_child("file", "child_sinks", "LinesSink", {out!r})
print(sink.pid, flush=True)
time.sleep(60)
"""


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    script = PARENT.format(tests=TESTS, out=str(tmp_path / "out.jsonl"))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists():
        status = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if status == "Z":  # dead, not yet reaped by init
            break
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.02)
