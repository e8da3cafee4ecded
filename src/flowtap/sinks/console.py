"""Readable console lines, one as a connection opens and one as it closes."""

from __future__ import annotations

import base64
from typing import IO, Any

from flowtap.records.access_log import console_line
from flowtap.records.connection import Record
from flowtap.sinks.base import LineSink
from flowtap.sinks.rotating import Rotation

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


def body_preview(encoded: str, limit: int = 2048) -> str:
    """A body for people: text as text (cut at limit), anything else as its size."""
    raw = base64.b64decode(encoded)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"[{human_bytes(len(raw))} of binary data]"
    if not text.isprintable() and not all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"[{human_bytes(len(raw))} of binary data]"
    return text[:limit] + (" [...]" if len(text) > limit else "")


def endpoint(ep: dict[str, Any]) -> str:
    ip = ep["ip"]
    return f"[{ip}]:{ep['port']}" if ":" in ip else f"{ip}:{ep['port']}"


class ConsoleSink(LineSink):
    def __init__(
        self,
        stream: IO[str],
        *,
        color: bool,
        owned: bool = False,
        rotation: Rotation | None = None,
    ) -> None:
        super().__init__(stream, owned=owned, rotation=rotation)
        self._color = color

    def _http(self, record: Record) -> str:
        """An access-log line, then headers and bodies when the capture level has them."""
        proc = record["process"]
        request, response = record.get("request"), record.get("response")
        who = self._paint(f"{proc['comm']}[{proc['pid']}]", _BOLD)
        what = f"{request['method']} {request['url']}" if request else "(request not seen)"
        status = response["status"] if response else "-"
        colour = _GREEN if response and response["status"] < 400 else _RED
        line = (
            f"{self._paint('http', _CYAN)} {who} {what} -> {self._paint(str(status), colour)}"
            f" ({record['duration_ms']:.0f} ms) sent {human_bytes(record['bytes_sent'])}"
            f" recv {human_bytes(record['bytes_received'])}"
        )
        if record.get("error"):
            line += " " + self._paint(record["error"], _RED)
        if record.get("capture_source") == "egress":
            line += " " + self._paint("via proxy", _DIM)
        lines = [line]
        for mark, part in ((">", request), ("<", response)):
            if not part:
                continue
            lines += [f"  {mark} {name}: {value}" for name, value in part.get("headers", [])]
            if part.get("body"):
                lines.append(f"  {mark} " + body_preview(part["body"]))
        return "\n".join(lines)

    def _paint(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self._color else text

    def format(self, record: Record) -> str:
        if record.get("type") == "http":
            return self._http(record)
        if record.get("type") == "access_log":  # Qtap's access_logs plugin: its format
            return console_line(record)
        if record.get("type") != "connection":
            return str(record)
        proc = record["process"]
        who = self._paint(f"{proc['comm']}[{proc['pid']}]", _BOLD)
        flow = f"{endpoint(record['local'])} -> {endpoint(record['remote'])}"
        if record["direction"] == "ingress":
            flow = f"{endpoint(record['local'])} <- {endpoint(record['remote'])}"
        head = f"{who} {record['direction']} {flow}"
        if record.get("capture_source") == "egress":
            head += " " + self._paint("via proxy", _DIM)
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
        egress = record.get("egress")
        if egress is not None and egress["outcome"] != "intercepted":
            detail = f" ({egress['detail']})" if egress.get("detail") else ""
            parts.append(self._paint(egress["outcome"] + detail, _YELLOW))
        status = record["status"]
        if status != "closed":
            colour = _GREEN if status == "open_at_exit" else _RED
            label = status + (f" ({record['error']})" if record.get("error") else "")
            parts.append(self._paint(label, colour))
        return " ".join(parts)
