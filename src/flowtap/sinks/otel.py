"""The `otel` event store: each record becomes an OpenTelemetry log record, sent over OTLP
(gRPC or HTTP/protobuf) by the official SDK's BatchLogRecordProcessor and OTLP exporters.

Why the counting wrapper: the SDK exports on its own thread and only logs a failed export;
flowtap must report every lost record. The exporter is wrapped to count what arrived and
what failed after the exporter's own retries, and the sink never hands the processor more
than its queue holds (the SDK's queue silently drops the oldest when full), so every
record the sink took is exported, failed (sink_errors) or refused (sink_dropped), once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import grpc
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import (
    OTLPLogExporter as HttpExporter,
)
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.sdk.resources import Resource

from flowtap.records.connection import Record
from flowtap.sinks.pipeline import SinkStats
from flowtap.sinks.qtap_format import to_qtap

Protocol_ = Literal["grpc", "http"]
DEFAULT_QUEUE = 2048  # log records waiting in the SDK's processor, at most
_BATCH = 512  # log records in one export request
_EXPORT_TIMEOUT_S = 10.0  # one export, retries included (the exporter backs off within it)
_CLOSE_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class OtelSettings:
    endpoint: str
    protocol: Protocol_ = "grpc"
    headers: tuple[tuple[str, str], ...] = ()  # secrets: never logged
    service_name: str = "flowtap"
    environment: str = ""
    insecure: bool = False  # plaintext (no TLS)
    ca_file: str | None = None  # roots for the collector's certificate (else the system's)
    queue: int = DEFAULT_QUEUE
    export_timeout_s: float = _EXPORT_TIMEOUT_S
    format: Literal["flowtap", "qtap"] = "flowtap"  # the attributes' names (qtap_format.py)


def parse_headers(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """K=V strings (flags, environment) as pairs; the message never repeats a value."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # Not echoed: "Authorization: Bearer ..." written with a colon is a secret.
            raise ValueError(
                f"OTLP header {len(pairs) + 1} is not KEY=VALUE (its text is not shown: it "
                "may be a secret); give each header as --otel-header KEY=VALUE"
            )
        pairs.append((key.strip().lower(), value.strip()))
    return tuple(pairs)


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested fields as dotted attribute names (process.pid, request.method); lists of one
    scalar type stay lists, other lists and mixed values become JSON text."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif value is None:
            continue
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, list | tuple):
            kinds = {type(item) for item in value}
            if len(kinds) == 1 and kinds <= {bool, int, float, str}:
                out[name] = list(value)
            elif value:
                out[name] = json.dumps(value, separators=(",", ":"))
        else:
            out[name] = str(value)
    return out


def body_of(record: Mapping[str, Any]) -> str:
    """A short line: the record's type and event (`connection open`, `http`)."""
    parts = [str(record.get("type", "record"))]
    if "event" in record:
        parts.append(str(record["event"]))
    return " ".join(parts)


class _CountingExporter(LogRecordExporter):
    """The OTLP exporter, with what it delivered and what it gave up on counted."""

    def __init__(self, inner: LogRecordExporter, lost: Any) -> None:
        self._inner = inner
        self._lost = lost  # called with the count of records an export failed to deliver
        self.exported = 0
        self.failed = 0
        self._lock = threading.Lock()

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        try:
            result = self._inner.export(batch)
        except Exception:  # the SDK would only log it: it is records lost
            result = LogRecordExportResult.FAILURE
        with self._lock:
            if result is LogRecordExportResult.SUCCESS:
                self.exported += len(batch)
            else:
                self.failed += len(batch)
        if result is not LogRecordExportResult.SUCCESS:
            self._lost(len(batch))
        return result

    def settled(self) -> int:
        with self._lock:
            return self.exported + self.failed

    def shutdown(self) -> None:
        self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _exporter(settings: OtelSettings) -> LogRecordExporter:
    headers = dict(settings.headers)
    if settings.protocol == "grpc":
        parts = urlsplit(
            settings.endpoint if "//" in settings.endpoint else "//" + settings.endpoint
        )
        target = parts.netloc or settings.endpoint
        credentials = None
        if not settings.insecure:
            roots = None
            if settings.ca_file is not None:
                try:
                    with open(settings.ca_file, "rb") as file:
                        roots = file.read()
                except OSError as exc:
                    raise ValueError(
                        f"cannot read the OTLP CA file {settings.ca_file}: {exc.strerror}; "
                        "give a readable PEM file to --otel-ca-file"
                    ) from exc
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return OTLPLogExporter(
            endpoint=target,
            insecure=settings.insecure,
            credentials=credentials,
            headers=headers,
            timeout=settings.export_timeout_s,
        )
    url = settings.endpoint
    if "//" not in url:
        url = ("http://" if settings.insecure else "https://") + url
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/v1/logs"  # the OTLP/HTTP logs path
    if url.startswith("http://") and not settings.insecure:
        raise ValueError(
            f"the OTLP endpoint {url} is plain http: give --otel-insecure to send records "
            "without TLS, or an https:// endpoint"
        )
    return HttpExporter(
        endpoint=url,
        certificate_file=settings.ca_file,
        headers=headers,
        timeout=settings.export_timeout_s,
    )


class OtelSink:
    """A batch sink for the pipeline: hands records to the SDK's processor, never waits
    for the network (the processor exports on its own thread)."""

    def __init__(self, settings: OtelSettings, exporter: LogRecordExporter | None = None) -> None:
        self.settings = settings
        self._stats: SinkStats | None = None
        self._stats_lock: threading.Lock | None = None
        self._counting = _CountingExporter(exporter or _exporter(settings), self._failed)
        resource = Resource.create(
            {
                "service.name": settings.service_name,
                "deployment.environment": settings.environment,
            }
        )
        self._provider = LoggerProvider(resource=resource)
        self._processor = BatchLogRecordProcessor(
            self._counting,
            max_queue_size=settings.queue,
            max_export_batch_size=min(_BATCH, settings.queue),
            export_timeout_millis=int(settings.export_timeout_s * 1000),
            schedule_delay_millis=200,
        )
        self._provider.add_log_record_processor(self._processor)
        self._logger = self._provider.get_logger("flowtap")
        self._qtap = settings.format == "qtap"
        self.emitted = 0  # records handed to the processor
        self.refused = 0  # records the processor had no room for

    def bind_stats(self, stats: SinkStats, lock: threading.Lock) -> None:
        """The pipeline's counts for this sink: an export that fails later moves its
        records from written to errors."""
        self._stats = stats
        self._stats_lock = lock

    def _move(self, count: int, *, to: Literal["errors", "dropped"]) -> None:
        if self._stats is None or self._stats_lock is None:
            return
        with self._stats_lock:
            self._stats.written -= count
            if to == "errors":
                self._stats.errors += count
            else:
                self._stats.dropped += count

    def _failed(self, count: int) -> None:
        self._move(count, to="errors")

    def unsettled(self) -> int:
        """Records handed to the SDK whose export has not ended yet (sinks/child.py)."""
        return max(0, self.emitted - self._counting.settled())

    def write_batch(self, records: list[Record]) -> None:
        refused = 0
        for record in records:
            # The SDK's queue drops its oldest silently when full: refuse (and count)
            # rather than overflow it. In flight = handed over, not yet settled.
            if self.emitted - self._counting.settled() >= self.settings.queue:
                refused += 1
                continue
            fields = to_qtap(record) if self._qtap else record
            self._logger.emit(body=body_of(record), attributes=flatten(fields))
            self.emitted += 1
        if refused:
            self.refused += refused
            # The pipeline counts the whole batch as written when this returns.
            self._move(refused, to="dropped")

    def close(self) -> None:
        """Exports what is queued (bounded), then counts what never settled as dropped."""
        self._provider.force_flush(_CLOSE_TIMEOUT_MS)
        self._provider.shutdown()
        unsettled = self.emitted - self._counting.settled()
        if unsettled > 0:
            self._move(unsettled, to="dropped")
