"""Connection records: the JSON-ready form documented in docs/records.md."""

from __future__ import annotations

import errno
import time
from datetime import UTC, datetime
from typing import Any

from flowtap.events import Conn
from flowtap.records.cmdline import redact_cmdline
from flowtap.tracking.processes import ProcessInfo

Record = dict[str, Any]


class WallClock:
    """Converts the kernel's CLOCK_MONOTONIC nanoseconds to RFC 3339 wall-clock time."""

    def __init__(self) -> None:
        self._offset_ns = time.time_ns() - time.monotonic_ns()
        self._second = -1
        self._stamp = ""

    def rfc3339(self, monotonic_ns: int) -> str:
        seconds, nanos = divmod(monotonic_ns + self._offset_ns, 1_000_000_000)
        if seconds != self._second:  # records come thousands a second: format it once
            self._stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = seconds
        return f"{self._stamp}.{nanos // 1000:06d}Z"


def process_record(info: ProcessInfo, tid: int) -> Record:
    return {
        "pid": info.pid,
        "tid": tid,
        "exe": info.exe,
        "comm": info.comm,
        "cmdline": list(redact_cmdline(info.cmdline)),  # credentials never leave the host
        "uid": info.uid,
        "user": info.user,
        "container_id": info.container_id,
    }


def errno_name(value: int) -> str | None:
    """'ECONNREFUSED' for 111 (sign ignored); None for 0."""
    value = abs(value)
    if value == 0:
        return None
    return errno.errorcode.get(value, f"E{value}")


def close_status(sock_error: int, established: bool) -> str:
    """How the connection ended: closed, reset, refused, timeout or failed."""
    if sock_error == errno.ECONNREFUSED:
        return "refused"
    if sock_error == errno.ETIMEDOUT:
        return "timeout"
    if sock_error in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if sock_error or not established:
        return "failed"
    return "closed"


def open_record(
    conn: Conn, process: Record, timestamp: str, *, state: str, error: str | None
) -> Record:
    return {
        "type": "connection",
        "event": "open",
        "connection_id": conn.conn_id,
        "timestamp": timestamp,
        "process": process,
        "family": conn.family,
        "socket_protocol": conn.protocol,
        "direction": conn.direction,
        "local": {"ip": conn.local.ip, "port": conn.local.port},
        "remote": {"ip": conn.remote.ip, "port": conn.remote.port},
        "state": state,
        "error": error,
    }


def close_record(
    opened: Record,
    conn: Conn,
    timestamp: str,
    *,
    bytes_sent: int,
    bytes_received: int,
    duration_ns: int,
    status: str,
    error: str | None,
    l7_protocol: str | None,
    sni: str | None,
) -> Record:
    record = dict(opened)
    del record["state"]  # the open record's view; the close record has status
    record.update(
        event="close",
        timestamp=timestamp,
        # The local port may only be known at close (a connect that failed inside connect()).
        local={"ip": conn.local.ip, "port": conn.local.port},
        remote={"ip": conn.remote.ip, "port": conn.remote.port},
        bytes_sent=bytes_sent,
        bytes_received=bytes_received,
        duration_ms=round(duration_ns / 1e6, 3),
        status=status,
        error=error,
        l7_protocol=l7_protocol,
        sni=sni,
    )
    return record
