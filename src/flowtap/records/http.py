"""HTTP transaction records: what the passive parsers saw, at the chosen capture level.

Levels follow Qtap: `none` (no record), `summary` (method, URL, status, sizes), `headers`
(plus headers, credentials redacted) and `full` (plus bodies, base64, capped).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

from flowtap.protocols.messages import Body, Request, Response, Transaction
from flowtap.records.cmdline import AUTH_SCHEMES, redact_query
from flowtap.records.connection import Record, WallClock

CaptureLevel = Literal["none", "summary", "headers", "full"]
CAPTURE_LEVELS: tuple[CaptureLevel, ...] = ("none", "summary", "headers", "full")
REDACTED = "[REDACTED]"

# Header names whose values are credentials, and the API-key style names around them.
_SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "www-authenticate",
        "proxy-authenticate",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
    }
)
_SECRET_PATTERN = re.compile(
    r"(api[-_]?key|auth[-_]?key|access[-_]?key|token|secret|password|credential|signature|"
    r"session|csrf|xsrf)"
)
# Known authorization schemes are kept: "Bearer [REDACTED]" still says how the client
# authenticated. An unknown first word may be the credential itself: all of it goes.
_SCHEMED = frozenset(
    {"authorization", "proxy-authorization", "www-authenticate", "proxy-authenticate"}
)


class ObjectPut(Protocol):
    """An object store (sinks/objects.py): the URL the bytes will have, None if not taken."""

    def put(self, data: bytes) -> str | None: ...


@dataclass(frozen=True)
class HttpRecordOptions:
    level: CaptureLevel = "summary"
    max_body_bytes: int = 64 << 10
    redact: bool = True
    # At level full, bodies and headers go here and the record carries their URLs.
    objects: ObjectPut | None = None


@dataclass(frozen=True)
class ConnectionContext:
    """What the connection contributes to each of its transactions' records."""

    connection_id: int
    process: Record
    direction: Literal["egress", "ingress"]
    tls: bool
    capture_source: str  # "plaintext", "openssl", ...
    # The other end, for rules on dst.* and tls.sni (None where not known).
    remote_ip: str | None = None
    remote_port: int | None = None
    sni: str | None = None


def is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_HEADERS or bool(_SECRET_PATTERN.search(lowered))


def redact(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers with credential values replaced; names and order kept."""
    redacted: list[tuple[str, str]] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered in ("location", "content-location", "referer"):
            redacted.append((name, redact_query(value)))
        elif not is_secret(name):
            redacted.append((name, value))
        elif lowered in _SCHEMED and " " in value.strip():
            scheme = value.strip().split(" ", 1)[0]
            shown = f"{scheme} {REDACTED}" if scheme.lower() in AUTH_SCHEMES else REDACTED
            redacted.append((name, shown))
        elif lowered in _SCHEMED and value.strip().lower() in AUTH_SCHEMES:
            redacted.append((name, value))  # a scheme alone (WWW-Authenticate: Negotiate)
        else:
            redacted.append((name, REDACTED))
    return redacted


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """The first value of a header, by case-insensitive name."""
    wanted = name.lower()
    return next((value for key, value in headers if key.lower() == wanted), None)


def first_values(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased name -> first value: one pass for all the headers a record names."""
    values: dict[str, str] = {}
    for key, value in headers:
        values.setdefault(key.lower(), value)
    return values


def _body(body: Body, options: HttpRecordOptions) -> tuple[str, bool]:
    """(base64 of the first max_body_bytes, truncated)."""
    kept = bytes(body.data[: options.max_body_bytes])
    truncated = body.truncated or len(kept) < body.size
    return base64.b64encode(kept).decode("ascii"), truncated


def _target(request: Request, tls: bool) -> tuple[str, str | None, str]:
    """(scheme, authority, path) from the request line or pseudo-headers; an absolute-form
    target (a proxy request) carries its own scheme and authority."""
    scheme = request.scheme or ("https" if tls else "http")
    authority = request.authority
    path = request.target
    if "://" in path:
        parts = urlsplit(path)
        scheme = parts.scheme or scheme
        authority = parts.netloc or authority
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
    return scheme, authority, path


def _grpc(path: str, content_type: str | None) -> dict[str, str] | None:
    """gRPC service and method from /package.Service/Method."""
    if not content_type or not content_type.startswith("application/grpc"):
        return None
    parts = path.lstrip("/").split("/")
    if len(parts) != 2:
        return None
    return {"service": parts[0], "method": parts[1]}


def _protocol(version: str) -> str:
    return "HTTP/2" if version == "2" else f"HTTP/{version}"


def request_part(request: Request, ctx: ConnectionContext, options: HttpRecordOptions) -> Record:
    scheme, authority, path = _target(request, ctx.tls)
    if options.redact:
        path = redact_query(path)
    named = first_values(request.headers)
    content_type = named.get("content-type")
    part: Record = {
        "method": request.method,
        "scheme": scheme,
        "authority": authority,
        "path": path,
        "url": f"{scheme}://{authority}{path}" if authority else path,
        "protocol": _protocol(request.version),
        "user_agent": named.get("user-agent"),
        "content_type": content_type,
        "body_size": request.body.size,
    }
    grpc = _grpc(path, content_type)
    if grpc is not None:
        part["grpc"] = grpc
    _add_detail(part, request.headers, request.body, options)
    return part


def response_part(response: Response, options: HttpRecordOptions) -> Record:
    named = first_values(response.headers)
    part: Record = {
        "status": response.status,
        "reason": response.reason,
        "content_type": named.get("content-type"),
        "body_size": response.body.size,
    }
    if response.informational:
        part["informational"] = list(response.informational)
    grpc_status = named.get("grpc-status")
    if grpc_status is not None:
        part["grpc_status"] = int(grpc_status) if grpc_status.isdigit() else grpc_status
    _add_detail(part, response.headers, response.body, options)
    return part


def _add_detail(
    part: Record, headers: list[tuple[str, str]], body: Body, options: HttpRecordOptions
) -> None:
    if options.level in ("headers", "full"):
        shown = redact(headers) if options.redact else headers
        part["headers"] = [[name, value] for name, value in shown]
    if options.level == "full" and options.objects is not None:
        _to_objects(part, body, options, options.objects)
    elif options.level == "full":
        part["body"], part["body_truncated"] = _body(body, options)


def _to_objects(part: Record, body: Body, options: HttpRecordOptions, store: ObjectPut) -> None:
    """The captured body and the (redacted) headers as objects: body_url and headers_url.
    Bytes the store cannot take stay inline, and the record says so (body_object_error)."""
    kept = bytes(body.data[: options.max_body_bytes])
    part["body_truncated"] = body.truncated or len(kept) < body.size
    url = store.put(kept) if kept else None
    if url is not None:
        part["body_url"] = url
    else:
        part["body"] = base64.b64encode(kept).decode("ascii")
        if kept:
            part["body_object_error"] = "upload queue full"
    headers_url = store.put(json.dumps(part["headers"], separators=(",", ":")).encode())
    if headers_url is not None:
        part["headers_url"] = headers_url


def http_record(
    tx: Transaction, ctx: ConnectionContext, options: HttpRecordOptions, clock: WallClock
) -> Record | None:
    """The record for one transaction; None at capture level none."""
    if options.level == "none":
        return None
    request, response = tx.request, tx.response
    start = request.start_ns if request else response.start_ns if response else 0
    end = response.end_ns if response else request.end_ns if request else start
    request_bytes = request.body.size if request else 0
    response_bytes = response.body.size if response else 0
    request_rec = request_part(request, ctx, options) if request else None
    response_rec = response_part(response, options) if response else None
    # The traced program sends the request when it is the client, the response otherwise.
    sent, received = (request_bytes, response_bytes)
    if ctx.direction == "ingress":
        sent, received = received, sent
    record: Record = {
        "type": "http",
        "connection_id": ctx.connection_id,
        "timestamp": clock.rfc3339(start),
        "process": ctx.process,
        "direction": ctx.direction,
        "capture_source": ctx.capture_source,
        "request": request_rec,
        "response": response_rec,
        "duration_ms": round(max(end - start, 0) / 1e6, 3),
        "bytes_sent": sent,
        "bytes_received": received,
        "stream_id": tx.stream_id,
        "error": tx.error,
        "truncated": {
            "request_body": bool(request_rec and request_rec.get("body_truncated")),
            "response_body": bool(response_rec and response_rec.get("body_truncated")),
        },
    }
    if tx.count != 1:
        # A summary of HTTP/2 streams reset before any response (a rapid-reset flood).
        record["streams"] = tx.count
    return record
