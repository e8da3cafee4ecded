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
from flowtap.records.model import BodyCapture, Grpc, HttpRecord, RequestPart, ResponsePart, to_dict

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


def _grpc(path: str, content_type: str | None) -> Grpc | None:
    """gRPC service and method from /package.Service/Method."""
    if not content_type or not content_type.startswith("application/grpc"):
        return None
    parts = path.lstrip("/").split("/")
    if len(parts) != 2:
        return None
    return Grpc(service=parts[0], method=parts[1])


def _protocol(version: str) -> str:
    return "HTTP/2" if version == "2" else f"HTTP/{version}"


def request_part(
    request: Request, ctx: ConnectionContext, options: HttpRecordOptions
) -> RequestPart:
    scheme, authority, path = _target(request, ctx.tls)
    if options.redact:
        path = redact_query(path)
    named = first_values(request.headers)
    content_type = named.get("content-type")
    headers, body = _detail(request.headers, request.body, options)
    # Positional: records are built thousands a second, and a frozen value's keywords cost.
    return RequestPart(
        request.method,
        scheme,
        authority,
        path,
        f"{scheme}://{authority}{path}" if authority else path,
        _protocol(request.version),
        named.get("user-agent"),
        content_type,
        request.body.size,
        _grpc(path, content_type),
        headers,
        body,
    )


def response_part(response: Response, options: HttpRecordOptions) -> ResponsePart:
    named = first_values(response.headers)
    grpc_status = named.get("grpc-status")
    headers, body = _detail(response.headers, response.body, options)
    return ResponsePart(
        response.status,
        response.reason,
        named.get("content-type"),
        response.body.size,
        tuple(response.informational),
        int(grpc_status) if grpc_status is not None and grpc_status.isdigit() else grpc_status,
        headers,
        body,
    )


def _detail(
    headers: list[tuple[str, str]], body: Body, options: HttpRecordOptions
) -> tuple[tuple[tuple[str, str], ...] | None, BodyCapture | None]:
    """The headers (levels headers and full) and the body (full) a part carries."""
    if options.level not in ("headers", "full"):
        return None, None
    shown = tuple(redact(headers) if options.redact else headers)
    if options.level != "full":
        return shown, None
    kept = bytes(body.data[: options.max_body_bytes])
    truncated = body.truncated or len(kept) < body.size
    if options.objects is not None:
        return shown, _to_objects(kept, truncated, shown, options.objects)
    return shown, BodyCapture(truncated, base64.b64encode(kept).decode("ascii"))


def _to_objects(
    kept: bytes, truncated: bool, headers: tuple[tuple[str, str], ...], store: ObjectPut
) -> BodyCapture:
    """The captured body and the (redacted) headers as objects: body_url and headers_url.
    Bytes the store cannot take stay inline, and the record says so (body_object_error)."""
    url = store.put(kept) if kept else None
    listed = [[name, value] for name, value in headers]
    headers_url = store.put(json.dumps(listed, separators=(",", ":")).encode())
    if url is not None:
        return BodyCapture(truncated, in_objects=True, url=url, headers_url=headers_url)
    return BodyCapture(
        truncated,
        base64.b64encode(kept).decode("ascii"),
        in_objects=True,
        object_error="upload queue full" if kept else None,
        headers_url=headers_url,
    )


def http_value(
    tx: Transaction, ctx: ConnectionContext, options: HttpRecordOptions, clock: WallClock
) -> HttpRecord | None:
    """The record for one transaction; None at capture level none."""
    if options.level == "none":
        return None
    request, response = tx.request, tx.response
    start = request.start_ns if request else response.start_ns if response else 0
    end = response.end_ns if response else request.end_ns if request else start
    request_bytes = request.body.size if request else 0
    response_bytes = response.body.size if response else 0
    # The traced program sends the request when it is the client, the response otherwise.
    sent, received = (request_bytes, response_bytes)
    if ctx.direction == "ingress":
        sent, received = received, sent
    return HttpRecord(
        ctx.connection_id,
        clock.rfc3339(start),
        ctx.process,
        ctx.direction,
        ctx.capture_source,
        request_part(request, ctx, options) if request else None,
        response_part(response, options) if response else None,
        round(max(end - start, 0) / 1e6, 3),
        sent,
        received,
        tx.stream_id,
        tx.error,
        tx.count,  # a summary of HTTP/2 streams reset before any response: more than 1
    )


def http_record(
    tx: Transaction, ctx: ConnectionContext, options: HttpRecordOptions, clock: WallClock
) -> Record | None:
    """http_value, serialized."""
    value = http_value(tx, ctx, options, clock)
    return to_dict(value) if value is not None else None
