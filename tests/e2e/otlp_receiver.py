"""OTLP log receivers for the tests, built on the opentelemetry-proto messages: a gRPC
LogsService and an OTLP/HTTP endpoint (POST /v1/logs, protobuf). Each keeps every log
record that arrived, decoded to plain values, with its resource's attributes."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class Arrived:
    body: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    headers: dict[str, str]


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in value.kvlist_value.values}
    return None if kind is None else getattr(value, kind)


class Collected:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[Arrived] = []
        self.requests = 0

    def add(
        self, request: logs_service_pb2.ExportLogsServiceRequest, headers: dict[str, str]
    ) -> None:
        with self.lock:
            self.requests += 1
            for resource_logs in request.resource_logs:
                resource = {kv.key: value_of(kv.value) for kv in resource_logs.resource.attributes}
                for scope_logs in resource_logs.scope_logs:
                    for log_record in scope_logs.log_records:
                        self.records.append(
                            Arrived(
                                body=value_of(log_record.body),
                                attributes={
                                    kv.key: value_of(kv.value) for kv in log_record.attributes
                                },
                                resource=resource,
                                headers=headers,
                            )
                        )

    def snapshot(self) -> list[Arrived]:
        with self.lock:
            return list(self.records)


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, collected: Collected) -> None:
        self.collected = collected

    def Export(  # noqa: N802 (the generated service's name)
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: grpc.ServicerContext
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        self.collected.add(request, {k: v for k, v in context.invocation_metadata()})
        return logs_service_pb2.ExportLogsServiceResponse()


class GrpcReceiver:
    """Start/stop/start again on the same port (the fault test)."""

    def __init__(self, port: int = 0) -> None:
        self.collected = Collected()
        self.port = port
        self._server: grpc.Server | None = None

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Logs(self.collected), server
        )
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port, "the OTLP gRPC receiver could not bind"
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None


class HttpReceiver:
    def __init__(self) -> None:
        self.collected = Collected()
        collected = self.collected

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.path == "/v1/logs", self.path
                assert self.headers["Content-Type"] == "application/x-protobuf"
                request = logs_service_pb2.ExportLogsServiceRequest()
                request.ParseFromString(data)
                collected.add(request, {k.lower(): v for k, v in self.headers.items()})
                body = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
