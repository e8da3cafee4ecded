"""The last step before a record leaves the sensor: the process's tags are attached, and DNS
flow records are dropped when the configuration says (Qtap's `tap.audit_include_dns`)."""

from __future__ import annotations

from collections.abc import Callable

from flowtap.records.connection import Record
from flowtap.tracking.environment import Tags, tags_record

_DNS_PORT = 53


def is_dns_flow(record: Record) -> bool:
    """A connection record of DNS: UDP to or from port 53, or a flow the sniffer called
    dns (DNS over TCP). Qtap's audit log leaves these out unless audit_include_dns."""
    if record.get("type") != "connection":
        return False
    if record.get("l7_protocol") == "dns":
        return True
    if record.get("socket_protocol") != "udp":
        return False
    ports = ((record.get("remote") or {}).get("port"), (record.get("local") or {}).get("port"))
    return _DNS_PORT in ports


class RecordFinisher:
    """tags_of: a pid's tags as the process registry has them (no /proc read)."""

    def __init__(self, tags_of: Callable[[int], Tags], *, include_dns: bool = True) -> None:
        self._tags_of = tags_of
        self.include_dns = include_dns
        self.dns_dropped = 0  # DNS flow records left out (audit_include_dns: false)

    def finish(self, record: Record) -> Record | None:
        """The record as it leaves, or None when it is left out."""
        if not self.include_dns and is_dns_flow(record):
            self.dns_dropped += 1
            return None
        process = record.get("process")
        pid = process.get("pid") if isinstance(process, dict) else None
        if isinstance(pid, int):
            tags = self._tags_of(pid)
            if tags:
                record["tags"] = tags_record(tags)
        return record
