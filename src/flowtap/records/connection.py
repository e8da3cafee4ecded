"""Connection records from the kernel's events (records/model.py has the typed values and
their JSON form, documented in docs/records.md)."""

from __future__ import annotations

import errno
import time
from datetime import UTC, datetime
from typing import Any

from flowtap.events import Conn
from flowtap.records.cmdline import redact_cmdline
from flowtap.records.model import (
    ConnectionRecord,
    Process,
    connection_close,
    connection_from_dict,
    connection_open,
    to_dict,
)
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


def process_value(info: ProcessInfo, tid: int) -> Process:
    return Process(
        pid=info.pid,
        tid=tid,
        exe=info.exe,
        comm=info.comm,
        cmdline=redact_cmdline(info.cmdline),  # credentials never leave the host
        uid=info.uid,
        user=info.user,
        container_id=info.container_id,
    )


def process_record(info: ProcessInfo, tid: int) -> Record:
    """The process as records carry it, serialized (the egress controller keeps these)."""
    return process_value(info, tid).to_dict()


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


def open_value(
    conn: Conn, process: Process | Record, timestamp: str, *, state: str, error: str | None
) -> ConnectionRecord:
    """The open record of a socket the kernel reported."""
    return connection_open(
        conn.conn_id,
        timestamp,
        process,
        family=conn.family,
        socket_protocol=conn.protocol,
        direction=conn.direction,
        local=conn.local,
        remote=conn.remote,
        state=state,
        error=error,
    )


def close_value(
    opened: ConnectionRecord,
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
) -> ConnectionRecord:
    return connection_close(
        opened,
        timestamp,
        # The local port may only be known at close (a connect that failed inside connect()).
        local=conn.local,
        remote=conn.remote,
        bytes_sent=bytes_sent,
        bytes_received=bytes_received,
        duration_ns=duration_ns,
        status=status,
        error=error,
        l7_protocol=l7_protocol,
        sni=sni,
    )


def open_record(
    conn: Conn, process: Record, timestamp: str, *, state: str, error: str | None
) -> Record:
    """open_value, serialized."""
    return to_dict(open_value(conn, process, timestamp, state=state, error=error))


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
    """close_value of a serialized open record, serialized."""
    return to_dict(
        close_value(
            connection_from_dict(opened),
            conn,
            timestamp,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            duration_ns=duration_ns,
            status=status,
            error=error,
            l7_protocol=l7_protocol,
            sni=sni,
        )
    )
