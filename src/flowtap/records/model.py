"""The records as typed values: what the sensor's and the proxy's paths build, and the one
function that turns them into their JSON-ready form (docs/records.md, docs/schema/).

Why typed: a record was a dict built by hand in several modules (the proxy's connection
record was a copy of the kernel's). Here each record is a frozen value, made by one set of
constructors for both paths, and `to_dict` is the only place that knows the JSON field
names and their order. The order is part of the output (the lines users diff and parse):
each serializer writes the fields in the order the records always had.

Records leave their builders (the trackers, the capture policy, the proxy's) serialized,
once: the finisher (records/finish.py) adds the process's tags to that form, and every
sink reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, TypeVar

# An address and port: the kernel's events already carry them as this frozen value.
from flowtap.events import Endpoint

Json = dict[str, Any]
_T = TypeVar("_T")


def _fast_init(cls: type[_T]) -> type[_T]:
    """A frozen dataclass's __init__, storing through its slots' descriptors: the same
    values and checks-free signature, half the cost. Why: a frozen dataclass's own
    __init__ calls object.__setattr__ once per field (~0.1 us each here), and the consumer
    builds three of these values per HTTP transaction, thousands a second."""
    params: list[str] = []
    lines: list[str] = []
    scope: dict[str, Any] = {}
    for index, spec in enumerate(dataclasses.fields(cls)):  # type: ignore[arg-type]
        assert spec.default_factory is MISSING, "immutable defaults only"
        setter, default = f"_set{index}", f"_default{index}"
        scope[setter] = getattr(cls, spec.name).__set__
        scope[default] = spec.default
        if not spec.init:
            lines.append(f"    {setter}(self, {default})")
            continue
        params.append(spec.name if spec.default is MISSING else f"{spec.name}={default}")
        lines.append(f"    {setter}(self, {spec.name})")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(lines)
    exec(source, scope)  # as dataclasses itself makes __init__
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@_fast_init
@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    tid: int
    exe: str | None
    comm: str
    cmdline: tuple[str, ...]  # credentials already redacted
    uid: int
    user: str | None
    container_id: str | None
    # The serialized form, made once: every record of the process shares it.
    _json: Json | None = field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> Json:
        if self._json is None:
            object.__setattr__(
                self,
                "_json",
                {
                    "pid": self.pid,
                    "tid": self.tid,
                    "exe": self.exe,
                    "comm": self.comm,
                    "cmdline": list(self.cmdline),
                    "uid": self.uid,
                    "user": self.user,
                    "container_id": self.container_id,
                },
            )
        assert self._json is not None
        return self._json


@_fast_init
@dataclass(frozen=True, slots=True)
class EgressDetail:
    """What the egress proxy did with a connection (close records of proxied ones)."""

    mode: str
    outcome: str | None
    tls: bool
    alpn: str | None
    detail: str | None


@_fast_init
@dataclass(frozen=True, slots=True)
class ConnectionClose:
    """What only a close record has."""

    bytes_sent: int
    bytes_received: int
    duration_ms: float
    status: str
    l7_protocol: str | None
    sni: str | None


@_fast_init
@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """A connection's open or close record, from the kernel's events or the proxy's."""

    connection_id: int
    timestamp: str
    process: Process | Json
    family: str
    socket_protocol: str
    direction: str
    local: Endpoint
    remote: Endpoint
    error: str | None
    state: str | None = None  # open records only
    closed: ConnectionClose | None = None  # close records only
    capture_source: str | None = None  # "egress" for the proxy's; the kernel's have none
    egress: EgressDetail | None = None  # the proxy's close records

    @property
    def event(self) -> Literal["open", "close"]:
        return "open" if self.closed is None else "close"


def connection_open(
    connection_id: int,
    timestamp: str,
    process: Process | Json,
    *,
    family: str,
    socket_protocol: str,
    direction: str,
    local: Endpoint,
    remote: Endpoint,
    state: str,
    error: str | None,
    capture_source: str | None = None,
) -> ConnectionRecord:
    """An open record: the kernel's (a socket event) or the proxy's (capture_source)."""
    return ConnectionRecord(
        connection_id,
        timestamp,
        process,
        family,
        socket_protocol,
        direction,
        local,
        remote,
        error,
        state,
        None,
        capture_source,
    )


def connection_close(
    opened: ConnectionRecord,
    timestamp: str,
    *,
    local: Endpoint,
    remote: Endpoint,
    bytes_sent: int,
    bytes_received: int,
    duration_ns: int,
    status: str,
    error: str | None,
    l7_protocol: str | None,
    sni: str | None,
    egress: EgressDetail | None = None,
) -> ConnectionRecord:
    """The close record of an opened connection: its identity, process and direction,
    with the endpoints as known at close (a failed connect learns its local port late)."""
    # Positional, not dataclasses.replace: a close record per connection, thousands a second.
    return ConnectionRecord(
        opened.connection_id,
        timestamp,
        opened.process,
        opened.family,
        opened.socket_protocol,
        opened.direction,
        local,
        remote,
        error,
        None,
        ConnectionClose(
            bytes_sent,
            bytes_received,
            round(duration_ns / 1e6, 3),
            status,
            l7_protocol,
            sni,
        ),
        opened.capture_source,
        egress,
    )


def process_json(process: Process | Json) -> Json:
    """A record's process as serialized: typed, or already a mapping (the egress
    controller's cache, a ConnectionContext's), shared by the records that carry it."""
    return process.to_dict() if isinstance(process, Process) else process


def _endpoint_json(endpoint: Endpoint) -> Json:
    return {"ip": endpoint.ip, "port": endpoint.port}


def _connection_json(record: ConnectionRecord) -> Json:
    out: Json = {
        "type": "connection",
        "event": record.event,
        "connection_id": record.connection_id,
        "timestamp": record.timestamp,
        "process": process_json(record.process),
        "family": record.family,
        "socket_protocol": record.socket_protocol,
        "direction": record.direction,
    }
    if record.capture_source is not None:
        out["capture_source"] = record.capture_source
    out["local"] = _endpoint_json(record.local)
    out["remote"] = _endpoint_json(record.remote)
    closed = record.closed
    if closed is None:
        out["state"] = record.state
        out["error"] = record.error
    else:
        # The kernel's close record has always had error before the counts (it was the
        # open record updated in place), the proxy's after status: both orders are kept.
        if record.egress is None:
            out["error"] = record.error
        out["bytes_sent"] = closed.bytes_sent
        out["bytes_received"] = closed.bytes_received
        out["duration_ms"] = closed.duration_ms
        out["status"] = closed.status
        if record.egress is not None:
            out["error"] = record.error
        out["l7_protocol"] = closed.l7_protocol
        out["sni"] = closed.sni
        if record.egress is not None:
            egress = record.egress
            out["egress"] = {
                "mode": egress.mode,
                "outcome": egress.outcome,
                "tls": egress.tls,
                "alpn": egress.alpn,
                "detail": egress.detail,
            }
    return out


def connection_from_dict(record: Mapping[str, Any]) -> ConnectionRecord:
    """An open record in its serialized form as a typed value (callers that kept the dict)."""
    closed = None
    if record.get("event") == "close":
        closed = ConnectionClose(
            bytes_sent=record["bytes_sent"],
            bytes_received=record["bytes_received"],
            duration_ms=record["duration_ms"],
            status=record["status"],
            l7_protocol=record.get("l7_protocol"),
            sni=record.get("sni"),
        )
    egress = record.get("egress")
    return ConnectionRecord(
        connection_id=record["connection_id"],
        timestamp=record["timestamp"],
        process=record["process"],
        family=record["family"],
        socket_protocol=record["socket_protocol"],
        direction=record["direction"],
        local=Endpoint(record["local"]["ip"], record["local"]["port"]),
        remote=Endpoint(record["remote"]["ip"], record["remote"]["port"]),
        error=record.get("error"),
        state=record.get("state") if closed is None else None,
        closed=closed,
        capture_source=record.get("capture_source"),
        egress=EgressDetail(**egress) if egress is not None else None,
    )


@_fast_init
@dataclass(frozen=True, slots=True)
class Grpc:
    service: str
    method: str


@_fast_init
@dataclass(frozen=True, slots=True)
class BodyCapture:
    """A body at capture level full: inline (base64), or in an object store (its URL)."""

    truncated: bool
    base64: str | None = None  # inline: always; with a store: what it could not take
    in_objects: bool = False  # an object store was configured
    url: str | None = None  # the body's object
    object_error: str | None = None  # why the bytes stayed inline
    headers_url: str | None = None  # the (redacted) headers' object


@_fast_init
@dataclass(frozen=True, slots=True)
class RequestPart:
    method: str
    scheme: str
    authority: str | None
    path: str
    url: str
    protocol: str
    user_agent: str | None
    content_type: str | None
    body_size: int
    grpc: Grpc | None = None
    headers: tuple[tuple[str, str], ...] | None = None  # levels headers and full
    body: BodyCapture | None = None  # level full


@_fast_init
@dataclass(frozen=True, slots=True)
class ResponsePart:
    status: int
    reason: str
    content_type: str | None
    body_size: int
    informational: tuple[int, ...] = ()  # 1xx responses before this one
    grpc_status: int | str | None = None
    headers: tuple[tuple[str, str], ...] | None = None
    body: BodyCapture | None = None


@_fast_init
@dataclass(frozen=True, slots=True)
class HttpRecord:
    """One HTTP transaction, from the passive parsers or the egress proxy."""

    connection_id: int
    timestamp: str
    process: Process | Json
    direction: str
    capture_source: str
    request: RequestPart | None
    response: ResponsePart | None
    duration_ms: float
    bytes_sent: int
    bytes_received: int
    stream_id: int | None
    error: str | None
    streams: int = 1  # HTTP/2 streams this record sums up (reset before any response)


def _body_json(out: Json, body: BodyCapture) -> None:
    if not body.in_objects:
        out["body"] = body.base64
        out["body_truncated"] = body.truncated
        return
    out["body_truncated"] = body.truncated
    if body.url is not None:
        out["body_url"] = body.url
    else:
        out["body"] = body.base64
        if body.object_error is not None:
            out["body_object_error"] = body.object_error
    if body.headers_url is not None:
        out["headers_url"] = body.headers_url


def _headers_json(headers: tuple[tuple[str, str], ...]) -> list[list[str]]:
    return [[name, value] for name, value in headers]


def _detail_json(out: Json, part: RequestPart | ResponsePart) -> None:
    """Headers and body, last, in both messages (levels headers and full)."""
    if part.headers is not None:
        out["headers"] = _headers_json(part.headers)
    if part.body is not None:
        _body_json(out, part.body)


def _request_json(part: RequestPart) -> Json:
    out: Json = {
        "method": part.method,
        "scheme": part.scheme,
        "authority": part.authority,
        "path": part.path,
        "url": part.url,
        "protocol": part.protocol,
        "user_agent": part.user_agent,
        "content_type": part.content_type,
        "body_size": part.body_size,
    }
    if part.grpc is not None:
        out["grpc"] = {"service": part.grpc.service, "method": part.grpc.method}
    _detail_json(out, part)
    return out


def _response_json(part: ResponsePart) -> Json:
    out: Json = {
        "status": part.status,
        "reason": part.reason,
        "content_type": part.content_type,
        "body_size": part.body_size,
    }
    if part.informational:
        out["informational"] = list(part.informational)
    if part.grpc_status is not None:
        out["grpc_status"] = part.grpc_status
    _detail_json(out, part)
    return out


def _http_json(record: HttpRecord) -> Json:
    request, response = record.request, record.response
    out: Json = {
        "type": "http",
        "connection_id": record.connection_id,
        "timestamp": record.timestamp,
        "process": process_json(record.process),
        "direction": record.direction,
        "capture_source": record.capture_source,
        "request": _request_json(request) if request is not None else None,
        "response": _response_json(response) if response is not None else None,
        "duration_ms": record.duration_ms,
        "bytes_sent": record.bytes_sent,
        "bytes_received": record.bytes_received,
        "stream_id": record.stream_id,
        "error": record.error,
        "truncated": {
            "request_body": bool(request and request.body and request.body.truncated),
            "response_body": bool(response and response.body and response.body.truncated),
        },
    }
    if record.streams != 1:
        out["streams"] = record.streams
    return out


@_fast_init
@dataclass(frozen=True, slots=True)
class AccessLogMessage:
    """A request or response as Qtap's access log shows it (modes details and full)."""

    headers: tuple[tuple[str, str], ...] | None  # repeated names joined; None: not seen
    body: str | None = None  # mode full: text, or "<binary>"
    proto: str | None = None  # requests: "http1" or "http2"


@_fast_init
@dataclass(frozen=True, slots=True)
class AccessLogRecord:
    """Qtap's access_logs plugin: one line per transaction, at its rules' mode."""

    connection_id: int
    timestamp: str
    mode: str  # summary, details or full
    format: str  # console or json
    process: Process | Json
    direction: str
    method: str
    url: str
    status: int
    bytes_sent: int = 0  # details and full
    bytes_received: int = 0
    request: AccessLogMessage | None = None  # details and full
    response: AccessLogMessage | None = None


def _access_message_json(out: Json, message: AccessLogMessage | None) -> Json:
    if message is None:
        return out
    if message.proto is not None:
        out["proto"] = message.proto
    if message.headers is not None:
        out["headers"] = dict(message.headers)
    if message.body is not None:
        out["body"] = message.body
    return out


def _access_log_json(record: AccessLogRecord) -> Json:
    out: Json = {
        "type": "access_log",
        "timestamp": record.timestamp,
        "connection_id": record.connection_id,
        "mode": record.mode,
        "format": record.format,
        "msg": "HTTP transaction",
        "process": process_json(record.process),
    }
    process = out["process"]
    if record.mode == "summary":
        out["bin"] = process.get("exe") or ""
        out["direction"] = record.direction
        out["method"] = record.method
        out["url"] = record.url
        out["status"] = record.status
    else:
        out["meta"] = {
            "bytes_sent": record.bytes_sent,
            "bytes_received": record.bytes_received,
            "pid": process.get("pid"),
            "exe": process.get("exe"),
        }
        out["direction"] = record.direction
        out["request"] = _access_message_json(
            {"url": record.url, "method": record.method}, record.request
        )
        out["response"] = _access_message_json({"status": record.status}, record.response)
    return out


TypedRecord = ConnectionRecord | HttpRecord | AccessLogRecord


def to_dict(record: TypedRecord | Mapping[str, Any]) -> Json:
    """The record's JSON-ready form, for every sink; a record already serialized (a
    dict) is returned as it is."""
    if isinstance(record, HttpRecord):
        return _http_json(record)
    if isinstance(record, ConnectionRecord):
        return _connection_json(record)
    if isinstance(record, AccessLogRecord):
        return _access_log_json(record)
    return record if isinstance(record, dict) else dict(record)
