"""sinks/qtap_format.py: flowtap's records in Qtap's shape, compared with the exact JSON
expected (docs/outputs.md has the mapping table)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult

from flowtap.sinks.jsonl import QtapJsonSink
from flowtap.sinks.otel import OtelSettings, OtelSink, flatten
from flowtap.sinks.qtap_format import headers_map, to_qtap

PROCESS = {
    "pid": 4242,
    "tid": 4242,
    "exe": "/usr/bin/curl",
    "comm": "curl",
    "cmdline": ["curl", "-s", "https://example.com/get"],
    "uid": 1000,
    "user": "alice",
    "container_id": None,
}

HTTP = {
    "type": "http",
    "connection_id": 17,
    "timestamp": "2026-12-06T23:00:00.123456Z",
    "process": PROCESS,
    "direction": "egress",
    "request": {
        "method": "GET",
        "scheme": "https",
        "authority": "example.com:8443",
        "path": "/get?x=1",
        "url": "https://example.com:8443/get?x=1",
        "protocol": "HTTP/1.1",
        "user_agent": "curl/8.5.0",
        "content_type": None,
        "body_size": 0,
        "headers": [["Host", "example.com:8443"], ["Accept", "*/*"], ["Accept", "text/plain"]],
        "body": "",
    },
    "response": {
        "status": 200,
        "reason": "OK",
        "content_type": "application/json",
        "body_size": 2,
        "headers": [["Content-Type", "application/json"], ["Content-Length", "2"]],
        "body": "e30=",
    },
    "duration_ms": 12.6,
    "bytes_sent": 80,
    "bytes_received": 120,
    "error": None,
}

CLOSE = {
    "type": "connection",
    "event": "close",
    "connection_id": 17,
    "timestamp": "2026-12-06T23:00:00.200000Z",
    "process": PROCESS,
    "family": "ipv4",
    "socket_protocol": "tcp",
    "direction": "egress",
    "local": {"ip": "10.0.0.5", "port": 40000},
    "remote": {"ip": "93.184.216.34", "port": 8443},
    "bytes_sent": 517,
    "bytes_received": 4096,
    "duration_ms": 80.0,
    "status": "closed",
    "error": None,
    "l7_protocol": "tls",
    "sni": "example.com",
}


def test_an_http_record_is_qtaps_http_transaction() -> None:
    assert to_qtap(HTTP) == {
        "metadata": {
            "process_id": "4242",
            "process_exe": "/usr/bin/curl",
            "bytes_sent": 80,
            "bytes_received": 120,
            "connection_id": "17",
            "endpoint_id": "example.com",
        },
        "request": {
            "method": "GET",
            "url": "https://example.com:8443/get?x=1",
            "scheme": "https",
            "path": "/get?x=1",
            "authority": "example.com:8443",
            "protocol": "http1",
            "user_agent": "curl/8.5.0",
            "headers": {"Host": "example.com:8443", "Accept": "*/*, text/plain"},
        },
        "response": {
            "status": 200,
            "content_type": "application/json",
            "headers": {"Content-Type": "application/json", "Content-Length": "2"},
            "body": "e30=",
        },
        "transaction_time": "2026-12-06T23:00:00.123456Z",
        "duration_ms": 13,
        "direction": "egress",
    }


def test_a_connection_record_is_qtaps_connection_event() -> None:
    assert to_qtap(CLOSE) == {
        "meta": {"connectionId": "17", "endpointId": "example.com"},
        "finalized": True,
        "timestamp": "2026-12-06T23:00:00.200000Z",
        "direction": "egress",
        "socketProtocol": "tcp",
        "l7Protocol": "other",
        "source": {
            "address": {"family": "ipv4", "ip": "10.0.0.5", "port": 40000},
            "exe": "/usr/bin/curl",
            "user": "alice",
        },
        "destination": {"address": {"family": "ipv4", "ip": "93.184.216.34", "port": 8443}},
        "bytesReceived": 4096,
        "bytesSent": 517,
    }


def test_an_ingress_open_puts_the_process_on_the_destination() -> None:
    opened = {
        k: v for k, v in CLOSE.items() if k not in ("bytes_sent", "bytes_received", "l7_protocol")
    }
    opened.update(event="open", direction="ingress", sni=None, state="established")
    assert to_qtap(opened) == {
        "meta": {"connectionId": "17", "endpointId": "93.184.216.34"},
        "timestamp": "2026-12-06T23:00:00.200000Z",
        "direction": "ingress",
        "socketProtocol": "tcp",
        "source": {"address": {"family": "ipv4", "ip": "93.184.216.34", "port": 8443}},
        "destination": {
            "address": {"family": "ipv4", "ip": "10.0.0.5", "port": 40000},
            "exe": "/usr/bin/curl",
            "user": "alice",
        },
    }


def test_the_json_sink_writes_qtaps_shape() -> None:
    stream = io.StringIO()
    QtapJsonSink(stream, owned=False).write(HTTP)
    assert json.loads(stream.getvalue()) == to_qtap(HTTP)
    assert stream.getvalue().count("\n") == 1


def test_other_records_and_headers() -> None:
    assert to_qtap({"type": "stats", "n": 1}) == {"type": "stats", "n": 1}
    assert headers_map(None) == {}
    assert headers_map([["a", "1"], ["b", "2"], ["a", "3"]]) == {"a": "1, 3", "b": "2"}


class Capture(LogRecordExporter):
    def __init__(self) -> None:
        self.records: list[ReadableLogRecord] = []

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        self.records.extend(batch)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def test_the_otel_sink_names_attributes_after_qtap() -> None:
    capture = Capture()
    settings = OtelSettings("127.0.0.1:1", insecure=True, format="qtap")
    sink = OtelSink(settings, exporter=capture)
    sink.write_batch([HTTP])
    sink.close()
    (log_record,) = capture.records
    attributes = dict(log_record.log_record.attributes or {})
    assert attributes == flatten(to_qtap(HTTP))
    assert attributes["metadata.process_id"] == "4242"
    assert log_record.log_record.body == "http"
