"""Qtap's `access_logs` plugin: one access-log record per HTTP transaction, at the mode its
rules choose (first match wins, else the plugin's `mode`).

Modes are Qtap's: `none` (no line), `summary` (process, direction, method, URL, status),
`details` (plus headers, sizes, pid), `full` (plus bodies). The fields follow Qtap's JSON
printer (pkg/plugins/accesslogs/json.go): at summary `bin`, `direction`, `method`, `url`,
`status`; at details and full `meta`, `direction`, `request`, `response`. flowtap adds its
envelope: `type` ("access_log"), `timestamp`, `connection_id`, `mode`, `format`, `process`.
Headers are redacted as in HTTP records (unless --no-redaction); bodies are text, or
"<binary>" as in Qtap, cut at max_body_bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from flowtap.protocols.messages import Body, Transaction
from flowtap.records.cmdline import redact_query
from flowtap.records.connection import Record, WallClock
from flowtap.records.http import CaptureLevel, ConnectionContext, HttpRecordOptions, _target, redact
from flowtap.records.model import AccessLogMessage, AccessLogRecord, to_dict

if TYPE_CHECKING:
    from flowtap.records.policy import CaptureRule

Mode = Literal["none", "summary", "details", "full"]
MODES: tuple[Mode, ...] = ("none", "summary", "details", "full")
Format = Literal["console", "json"]
# A mode as the capture level the parsers must keep for it (details: headers).
MODE_LEVEL: dict[str, CaptureLevel] = {
    "none": "none",
    "summary": "summary",
    "details": "headers",
    "full": "full",
}
LEVEL_MODE: dict[str, Mode] = {level: mode for mode, level in MODE_LEVEL.items()}  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class AccessLogs:
    """One stack's access_logs plugin. rules hold CaptureRule values whose level is the
    rule's mode as a capture level (MODE_LEVEL)."""

    mode: Mode = "summary"
    format: Format = "console"
    rules: tuple[CaptureRule, ...] = ()


def _headers(
    headers: list[tuple[str, str]], options: HttpRecordOptions
) -> tuple[tuple[str, str], ...]:
    """Qtap's headers are a map: a repeated name's values joined with ", ", in order."""
    shown = redact(headers) if options.redact else headers
    out: dict[str, str] = {}
    for name, value in shown:
        out[name] = f"{out[name]}, {value}" if name in out else value
    return tuple(out.items())


def _body_text(body: Body, options: HttpRecordOptions) -> str:
    kept = bytes(body.data[: options.max_body_bytes])
    try:
        return kept.decode("utf-8")
    except UnicodeDecodeError:
        return "<binary>"


def access_log_value(
    tx: Transaction,
    ctx: ConnectionContext,
    *,
    mode: Mode,
    fmt: Format,
    options: HttpRecordOptions,
    clock: WallClock,
) -> AccessLogRecord | None:
    """The access-log record of one transaction; None at mode none."""
    if mode == "none":
        return None
    request, response = tx.request, tx.response
    start = request.start_ns if request else response.start_ns if response else 0
    url = method = None
    if request is not None:
        scheme, authority, path = _target(request, ctx.tls)
        if options.redact:
            path = redact_query(path)
        url = f"{scheme}://{authority}{path}" if authority else path
        method = request.method
    status = response.status if response else 0
    summary = mode == "summary"
    sent = request.body.size if request and not summary else 0
    received = response.body.size if response and not summary else 0
    if ctx.direction == "ingress":
        sent, received = received, sent
    full = mode == "full"
    req = resp = None
    if request is not None and not summary:
        req = AccessLogMessage(
            _headers(request.headers, options),
            _body_text(request.body, options) if full else None,
            "http2" if request.version == "2" else "http1",
        )
    if response is not None and not summary:
        resp = AccessLogMessage(
            _headers(response.headers, options),
            _body_text(response.body, options) if full else None,
        )
    return AccessLogRecord(
        ctx.connection_id,
        clock.rfc3339(start),
        mode,
        fmt,
        ctx.process,
        ctx.direction,
        method or "",
        url or "",
        status,
        sent,
        received,
        req,
        resp,
    )


def access_log_record(
    tx: Transaction,
    ctx: ConnectionContext,
    *,
    mode: Mode,
    fmt: Format,
    options: HttpRecordOptions,
    clock: WallClock,
) -> Record | None:
    """access_log_value, serialized."""
    value = access_log_value(tx, ctx, mode=mode, fmt=fmt, options=options, clock=clock)
    return to_dict(value) if value is not None else None


def console_line(record: Record) -> str:
    """Qtap's console summary: `■ curl → GET http://host/path 200`; at details and full
    the headers and bodies follow, one per line."""
    if record.get("format") == "json":
        import json  # noqa: PLC0415

        shown = {k: v for k, v in record.items() if k not in ("format", "process")}
        return json.dumps(shown, separators=(",", ":"))
    if record.get("mode") == "summary":
        exe, direction = record.get("bin") or "", record.get("direction", "")
        method, url, status = record.get("method", ""), record.get("url", ""), record.get("status")
    else:
        exe, direction = record["meta"].get("exe") or "", record.get("direction", "")
        method, url = record["request"].get("method", ""), record["request"].get("url", "")
        status = record["response"].get("status")
    arrow = "→" if "egress" in str(direction) else "←"
    lines = [f"■ {exe.rsplit('/', 1)[-1]} {arrow} {method} {url} {status}"]
    for mark, part in ((">", record.get("request")), ("<", record.get("response"))):
        if not part:
            continue
        lines += [f"  {mark} {name}: {value}" for name, value in part.get("headers", {}).items()]
        if part.get("body"):
            lines.append(f"  {mark} {part['body'][:2048]}")
    return "\n".join(lines)
