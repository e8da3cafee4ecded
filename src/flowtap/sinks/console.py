"""Readable console lines, one as a connection opens and one as it closes."""

from __future__ import annotations

from typing import IO, Any

from flowtap.records.connection import Record
from flowtap.sinks.base import LineSink

_RESET = "\033[0m"
_DIM = "\033[2m"
_BOLD = "\033[1m"
_GREEN = "\033[32m"
_RED = "\033[31m"
_CYAN = "\033[36m"
_YELLOW = "\033[33m"


def human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    units = ("KiB", "MiB", "GiB", "TiB", "PiB")
    for unit in units:
        value /= 1024
        if round(value, 1) < 1024 or unit == units[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def endpoint(ep: dict[str, Any]) -> str:
    ip = ep["ip"]
    return f"[{ip}]:{ep['port']}" if ":" in ip else f"{ip}:{ep['port']}"


class ConsoleSink(LineSink):
    def __init__(self, stream: IO[str], *, color: bool, owned: bool = False) -> None:
        super().__init__(stream, owned=owned)
        self._color = color

    def _paint(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self._color else text

    def format(self, record: Record) -> str:
        if record.get("type") != "connection":
            return str(record)
        proc = record["process"]
        who = self._paint(f"{proc['comm']}[{proc['pid']}]", _BOLD)
        flow = f"{endpoint(record['local'])} -> {endpoint(record['remote'])}"
        if record["direction"] == "ingress":
            flow = f"{endpoint(record['local'])} <- {endpoint(record['remote'])}"
        head = f"{who} {record['direction']} {flow}"
        if record["event"] == "open":
            state = record["state"]
            mark = self._paint("open", _CYAN) if state != "failed" else self._paint("fail", _RED)
            extra = f" {state}" if state != "established" else ""
            if record.get("error"):
                extra += f" ({record['error']})"
            return f"{mark} {head}{extra}"
        parts = [self._paint("close", _DIM), head]
        if record.get("l7_protocol"):
            parts.append(self._paint(record["l7_protocol"], _YELLOW))
        if record.get("sni"):
            parts.append(f"sni={record['sni']}")
        parts.append(f"sent {human_bytes(record['bytes_sent'])}")
        parts.append(f"recv {human_bytes(record['bytes_received'])}")
        parts.append(f"{record['duration_ms']:.0f} ms")
        status = record["status"]
        if status != "closed":
            colour = _GREEN if status == "open_at_exit" else _RED
            label = status + (f" ({record['error']})" if record.get("error") else "")
            parts.append(self._paint(label, colour))
        return " ".join(parts)
