"""Reading the store: rows chosen by time and kind in SQL, then by a rule of the
configuration's rule language (flowtap.rules) over a fields view of each stored record."""

from __future__ import annotations

import ipaddress
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flowtap.rules.evaluate import MISSING, Rule, compile_rule
from flowtap.rules.fields import canonical, is_known

Record = dict[str, Any]


def _ip(value: object) -> object:
    if not isinstance(value, str):
        return MISSING
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return MISSING


def _header(part: Record | None, name: str) -> object:
    for key, value in (part or {}).get("headers", []):
        if key.lower() == name:
            return value
    return MISSING


class StoredFields:
    """The rule language's fields (docs/configuration.md) for one stored record."""

    def __init__(self, record: Record, remote: Record | None) -> None:
        self._record = record
        self._remote = remote or record.get("remote") or {}

    def lookup(self, name: str) -> object:
        name = canonical(name)
        value = self._value(name)
        return MISSING if value is None else value

    def _value(self, name: str) -> object:
        record = self._record
        proc = record.get("process") or {}
        request, response = record.get("request"), record.get("response")
        if name.startswith("http.req.headers."):
            return _header(request, name.removeprefix("http.req.headers."))
        if name.startswith("http.res.headers."):
            return _header(response, name.removeprefix("http.res.headers."))
        url = (request or {}).get("url")
        values: dict[str, object] = {
            "http.req.method": (request or {}).get("method"),
            "http.req.path": urlsplit(url).path if url else (request or {}).get("path"),
            "http.req.url": url,
            "http.req.host": (request or {}).get("authority")
            or (urlsplit(url).hostname if url else None),
            "http.req.scheme": (request or {}).get("scheme"),
            "http.req.version": (request or {}).get("protocol"),
            "http.res.status": (response or {}).get("status"),
            "src.process.path": proc.get("exe"),
            "src.process.binary": os.path.basename(proc.get("exe") or "") or None,
            "src.process.pid": proc.get("pid"),
            "src.process.user.name": proc.get("user"),
            "src.process.user.id": proc.get("uid"),
            "src.container.id": proc.get("container_id"),
            "dst.ip": _ip(self._remote.get("ip")),
            "dst.port": self._remote.get("port"),
            "dst.domain": record.get("sni")
            or (request or {}).get("authority")
            or (urlsplit(url).hostname if url else None),
            "tls.sni": record.get("sni"),
            "direction": record.get("direction"),
            "protocol": "http" if record.get("type") == "http" else record.get("l7_protocol"),
        }
        return values.get(name)


def compile_filter(words: list[str]) -> Rule | None:
    """FILTER words joined into one rule: `flowtap query src.process.pid == 42`."""
    text = " ".join(words).strip()
    if not text:
        return None
    return compile_rule(text, known_fields=is_known)


@dataclass(frozen=True)
class Selection:
    kind: str = "http"  # http | connections
    since: float | None = None  # seconds since the epoch
    rule: Rule | None = None
    limit: int | None = None


def select(db: sqlite3.Connection, selection: Selection) -> Iterator[Record]:
    """Stored records, oldest first, that match the selection."""
    table = "http" if selection.kind == "http" else "connections"
    sql = f"SELECT run, connection_id, record FROM {table}"
    params: list[object] = []
    if selection.since is not None:
        sql += " WHERE ts >= ?"
        params.append(selection.since)
    sql += " ORDER BY ts, id"
    remote_of = db.cursor()
    count = 0
    for run, conn_id, text in db.execute(sql, params):
        record: Record = json.loads(text)
        if selection.rule is not None:
            remote = None
            if table == "http":
                row = remote_of.execute(
                    "SELECT remote_ip, remote_port FROM connections WHERE run = ? AND "
                    "connection_id = ? LIMIT 1",
                    (run, conn_id),
                ).fetchone()
                remote = {"ip": row[0], "port": row[1]} if row else None
            if not selection.rule.matches(StoredFields(record, remote)):
                continue
        yield record
        count += 1
        if selection.limit is not None and count >= selection.limit:
            return
