"""The otel sink's own parts: attributes, headers, and the accounting of what an export
could not deliver (a real BatchLogRecordProcessor, an exporter that fails on purpose)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult

from flowtap.sinks.otel import OtelSettings, OtelSink, body_of, flatten, parse_headers
from flowtap.sinks.pipeline import Pipeline


def test_flatten_dots_nested_fields() -> None:
    record: dict[str, object] = {
        "type": "http",
        "process": {"pid": 7, "cmdline": ["curl", "-s"]},
        "request": {"method": "GET", "headers": [["a", "1"]]},
        "error": None,
        "tags": [],
    }
    assert flatten(record) == {
        "type": "http",
        "process.pid": 7,
        "process.cmdline": ["curl", "-s"],
        "request.method": "GET",
        "request.headers": '[["a","1"]]',
    }
    assert body_of({"type": "connection", "event": "open"}) == "connection open"


def test_a_bad_header_does_not_echo_its_value() -> None:
    assert parse_headers(["Authorization=Bearer x=y"]) == (("authorization", "Bearer x=y"),)
    with pytest.raises(ValueError) as caught:
        parse_headers(["a=1", "Authorization: Bearer secretvalue"])
    assert "KEY=VALUE" in str(caught.value) and "header 2 " in str(caught.value)
    assert "secret" + "value" not in str(caught.value) and "Bearer" not in str(caught.value)
    with pytest.raises(ValueError):
        parse_headers(["=v"])


class Failing(LogRecordExporter):
    """Fails every export (a collector that is down past the exporter's retries), until
    told to accept; blocks while `hold` is clear."""

    def __init__(self) -> None:
        self.accept = False
        self.hold = threading.Event()
        self.hold.set()
        self.delivered = 0

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        self.hold.wait(10)
        if not self.accept:
            return LogRecordExportResult.FAILURE
        self.delivered += len(batch)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def test_failed_exports_and_a_full_queue_are_counted() -> None:
    exporter = Failing()
    sink = OtelSink(OtelSettings(endpoint="unused", queue=8), exporter)
    pipeline = Pipeline([("otel", sink)])
    for pid in range(5):
        pipeline.submit({"type": "connection", "process": {"pid": pid}})
    # Failed exports move their records from written to errors.
    stats = pipeline.stats()["otel"]
    for _ in range(500):
        if stats.errors == 5:
            break
        threading.Event().wait(0.01)
    assert (stats.written, stats.errors, stats.dropped) == (0, 5, 0)
    # The exporter stuck: the processor's queue (8) fills, the rest is refused and counted.
    exporter.hold.clear()
    exporter.accept = True
    for pid in range(30):
        pipeline.submit({"type": "connection", "process": {"pid": pid}})
    for _ in range(500):
        if stats.written + stats.dropped == 30:
            break
        threading.Event().wait(0.01)
    exporter.hold.set()
    pipeline.close()
    assert stats.errors == 5
    assert stats.dropped == 30 - 8
    assert stats.written == exporter.delivered == 8
