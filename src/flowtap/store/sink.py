"""The store as a pipeline sink: a batch of records is one SQLite transaction (all rows or
none, so the pipeline's counts stay exact), then retention by age and size."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowtap.records.connection import Record
from flowtap.store.db import StoreError, connect

# Retention looks at most this often (it deletes by index; cheap, but not per batch).
_RETENTION_S = 1.0
_DELETE_CHUNK = 200  # rows removed per step when over the size limit
_INSERT_CONNECTION = (
    "INSERT INTO connections (run, ts, connection_id, event, pid, comm, exe, direction, "
    "local_ip, local_port, remote_ip, remote_port, record) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_HTTP = (
    "INSERT INTO http (run, ts, connection_id, pid, comm, exe, method, url, host, path, "
    "status, duration_ms, record) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def record_time(record: Record) -> float:
    """The record's timestamp (RFC 3339, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def _process(record: Record) -> tuple[Any, Any, Any]:
    proc = record.get("process") or {}
    return proc.get("pid"), proc.get("comm"), proc.get("exe")


class StoreSink:
    def __init__(
        self, path: Path, *, max_age_s: float = 0.0, max_bytes: int = 0, clock: Any = time.time
    ) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._db = connect(path, create=True)
        self._run = f"{os.getpid()}-{time.time_ns()}"
        self._next_retention = 0.0
        self.deleted = 0  # rows removed by retention

    def write(self, record: Record) -> None:
        self.write_batch([record])

    def write_batch(self, records: list[Record]) -> None:
        # Rows are built before the transaction: a record that cannot be stored fails the
        # batch before anything is written, and the transaction is short.
        connections: list[tuple[Any, ...]] = []
        http: list[tuple[Any, ...]] = []
        for record in records:
            kind = record.get("type")
            if kind == "connection":
                connections.append(self._connection_row(record))
            elif kind == "http":
                http.append(self._http_row(record))
            # Other record types (access_log: its http record has the same) are not kept.
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if connections:
                db.executemany(_INSERT_CONNECTION, connections)
            if http:
                db.executemany(_INSERT_HTTP, http)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back itself (a full disk)
                db.execute("ROLLBACK")
            raise
        now = time.monotonic()
        if now >= self._next_retention:
            self._next_retention = now + _RETENTION_S
            self.apply_retention()

    def _connection_row(self, record: Record) -> tuple[Any, ...]:
        pid, comm, exe = _process(record)
        local, remote = record.get("local") or {}, record.get("remote") or {}
        return (
            self._run,
            record_time(record),
            record["connection_id"],
            record["event"],
            pid,
            comm,
            exe,
            record.get("direction"),
            local.get("ip"),
            local.get("port"),
            remote.get("ip"),
            remote.get("port"),
            json.dumps(record, separators=(",", ":")),
        )

    def _http_row(self, record: Record) -> tuple[Any, ...]:
        pid, comm, exe = _process(record)
        request, response = record.get("request") or {}, record.get("response") or {}
        url = request.get("url")
        return (
            self._run,
            record_time(record),
            record["connection_id"],
            pid,
            comm,
            exe,
            request.get("method"),
            url,
            request.get("authority") or (urlsplit(url).hostname if url else None),
            request.get("path"),
            response.get("status"),
            record.get("duration_ms"),
            json.dumps(record, separators=(",", ":")),
        )

    def used_bytes(self) -> int:
        """Bytes the rows take (the file keeps freed pages for reuse; it does not shrink)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        size: int = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def apply_retention(self) -> None:
        """Rows older than max_age_s go; then the oldest rows until under max_bytes."""
        db = self._db
        if self.max_age_s > 0:
            cutoff = self._clock() - self.max_age_s
            for table in ("connections", "http"):
                self.deleted += db.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,)).rowcount
        while self.max_bytes > 0 and self.used_bytes() > self.max_bytes:
            removed = self._delete_oldest(_DELETE_CHUNK)
            if removed == 0:
                break
            self.deleted += removed

    def _delete_oldest(self, count: int) -> int:
        """The `count` oldest rows of both tables together."""
        rows = self._db.execute(
            "SELECT 'connections', id, ts FROM connections UNION ALL "
            "SELECT 'http', id, ts FROM http ORDER BY ts, id LIMIT ?",
            (count,),
        ).fetchall()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, row_id, _ts in rows:
                self._db.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,))
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return len(rows)

    def close(self) -> None:
        self._db.close()


def store_sink(settings: Mapping[str, object]) -> StoreSink:
    """The --store sink from the run's settings (flowtap.settings.options)."""
    path, max_age, max_bytes = (
        settings["store"],
        settings["store_max_age"],
        settings["store_max_bytes"],
    )
    assert isinstance(path, Path) and isinstance(max_age, float) and isinstance(max_bytes, int)
    if max_age < 0 or max_bytes < 0:
        raise StoreError("--store-max-age and --store-max-bytes are 0 (off) or positive")
    return StoreSink(path, max_age_s=max_age, max_bytes=max_bytes)
