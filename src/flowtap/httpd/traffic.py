"""Counters the sensor has no equivalent of: bytes of closed connections and HTTP requests
by method, status class and host. Counted as records leave the sensor (an observer of its
pipeline, on the consumer's thread), under a lock held for a dictionary update only."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from flowtap.records.connection import Record

# Label values come from traced traffic, which anyone can shape: a fixed set of methods
# and the first MAX_HOSTS hosts seen get labels of their own, the rest are "other", so
# a scanner cannot grow the scrape (or Prometheus's memory) without bound.
MAX_HOSTS = 100
_MAX_HOST_CHARS = 253  # a DNS name's limit
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
OTHER = "other"


@dataclass(frozen=True)
class TrafficSnapshot:
    bytes_sent: int
    bytes_received: int
    requests: dict[tuple[str, str, str], int]  # (method, status class, host) -> count


class TrafficCounter:
    """Fed by the consumer thread, read by the endpoints' threads."""

    def __init__(self, max_hosts: int = MAX_HOSTS) -> None:
        self._lock = threading.Lock()
        self._max_hosts = max_hosts
        self._hosts: set[str] = set()
        self._bytes_sent = 0
        self._bytes_received = 0
        self._requests: Counter[tuple[str, str, str]] = Counter()

    def count(self, record: Record) -> None:
        kind = record.get("type")
        if kind == "connection" and record.get("event") == "close":
            with self._lock:
                self._bytes_sent += int(record.get("bytes_sent") or 0)
                self._bytes_received += int(record.get("bytes_received") or 0)
        elif kind == "http":
            request = record.get("request") or {}
            response = record.get("response") or {}
            method = request.get("method")
            method = method if method in METHODS else OTHER
            status = response.get("status")
            status_class = f"{status // 100}xx" if isinstance(status, int) else "none"
            host = self._host(request.get("authority"))
            with self._lock:
                self._requests[(method, status_class, host)] += 1

    def _host(self, authority: object) -> str:
        """The host as the client named it (port kept: it tells services apart)."""
        if not isinstance(authority, str) or not authority:
            return "unknown"
        host = authority.lower()[:_MAX_HOST_CHARS]
        if host in self._hosts:
            return host
        if len(self._hosts) >= self._max_hosts:
            return OTHER
        self._hosts.add(host)
        return host

    def snapshot(self) -> TrafficSnapshot:
        with self._lock:
            return TrafficSnapshot(self._bytes_sent, self._bytes_received, dict(self._requests))
