"""The records as typed values: what the sensor's and the proxy's paths build, and the one
function that turns them into their JSON-ready form (docs/records.md, docs/schema/).

Why typed: a record was a dict built by hand in several modules (the proxy's connection
record was a copy of the kernel's). Here each record is a frozen value, made by one set of
constructors for both paths, and `to_dict` is the only place that knows the JSON field
names and their order. The order is part of the output (the lines users diff and parse):
each serializer writes the fields in the order the records always had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Json = dict[str, Any]
Tags = Mapping[str, list[str]]


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


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class EgressDetail:
    """What the egress proxy did with a connection (close records of proxied ones)."""

    mode: str
    outcome: str | None
    tls: bool
    alpn: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class ConnectionClose:
    """What only a close record has."""

    bytes_sent: int
    bytes_received: int
    duration_ms: float
    status: str
    l7_protocol: str | None
    sni: str | None


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
    tags: Tags | None = None

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
        connection_id=connection_id,
        timestamp=timestamp,
        process=process,
        family=family,
        socket_protocol=socket_protocol,
        direction=direction,
        local=local,
        remote=remote,
        error=error,
        state=state,
        capture_source=capture_source,
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
    return dataclasses.replace(
        opened,
        timestamp=timestamp,
        local=local,
        remote=remote,
        error=error,
        state=None,
        closed=ConnectionClose(
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            duration_ms=round(duration_ns / 1e6, 3),
            status=status,
            l7_protocol=l7_protocol,
            sni=sni,
        ),
        egress=egress,
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
    if record.tags is not None:
        out["tags"] = record.tags
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
        tags=record.get("tags"),
    )


TypedRecord = ConnectionRecord


def to_dict(record: TypedRecord | Mapping[str, Any]) -> Json:
    """The record's JSON-ready form, for every sink; a record already serialized (a
    dict) is returned as it is."""
    if isinstance(record, ConnectionRecord):
        return _connection_json(record)
    return record if isinstance(record, dict) else dict(record)
