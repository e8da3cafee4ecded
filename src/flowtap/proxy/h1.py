"""Strict HTTP/1.x message heads for the proxy (sans-IO): framing decided, smuggling refused.

The proxy forwards each head byte for byte; this module only decides whether it is safe to
forward and how the body that follows is delimited. Anything two HTTP implementations could
read differently is refused (RFC 9112 §6.3, §11.2): Content-Length together with
Transfer-Encoding, more than one Content-Length, any transfer-coding but a single
``chunked``, obs-fold, bare CR or LF, whitespace before a colon, control characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Framing",
    "HttpError",
    "RequestHead",
    "ResponseHead",
    "UpstreamError",
    "error_response",
    "parse_chunk_size",
    "parse_request_head",
    "parse_response_head",
]

Framing = Literal["none", "length", "chunked", "close"]

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/1\.([01])\Z")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[^\r\n]*)?)\r\n\Z")
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request we refuse: answered with ``status`` and the connection closed. ``kind``
    names the counter it goes to (smuggling, bad_request, header_too_large...).

    ``detail`` goes to the client (X-Flowtap-Error) and into records: it says what was
    wrong and where, never quoting the request's bytes (they may hold credentials)."""

    def __init__(self, status: int, detail: str, kind: str = "bad_request") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind


class UpstreamError(Exception):
    """The upstream's response cannot be forwarded safely."""


def error_response(status: int, detail: str) -> bytes:
    """A complete response the proxy makes itself; the connection closes after it."""
    body = f"flowtap egress proxy: {detail}\n".encode("utf-8", "replace")
    # The detail goes in a header too, so it shows in records at the headers level.
    safe = re.sub(r"[^\x20-\x7e]", "?", detail)[:200]
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: close\r\n"
        f"X-Flowtap-Error: {safe}\r\n\r\n"
    ).encode("latin-1") + body


class _RefusedError(Exception):
    def __init__(self, detail: str, kind: str = "smuggling", status: int = 400) -> None:
        super().__init__(detail)
        self.detail = detail
        self.kind = kind
        self.status = status


@dataclass(slots=True)
class _Fields:
    headers: list[tuple[bytes, bytes]]  # (name as sent, value without surrounding spaces)
    content_length: int | None
    chunked: bool
    connection: set[bytes]  # lower-cased Connection options
    hosts: int
    expect_continue: bool
    upgrade: bool


def _lines(raw: bytes) -> list[bytes]:
    """The head's lines (the blank line at its end removed); bare CR or LF refused."""
    if not raw.endswith(b"\r\n\r\n"):
        raise _RefusedError("header section does not end with CRLF CRLF")
    lines = raw[:-4].split(b"\r\n")
    for line in lines:
        if b"\n" in line or b"\r" in line:
            raise _RefusedError("bare CR or LF in the header section")
    return lines


def _fields(lines: list[bytes], max_headers: int) -> _Fields:
    if len(lines) > max_headers:
        raise _RefusedError(f"more than {max_headers} header fields", "header_too_large", 431)
    headers: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    te: list[bytes] = []
    connection: set[bytes] = set()
    hosts = 0
    expect = False
    upgrade = False
    for number, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            raise _RefusedError("obsolete line folding (obs-fold) in the header section")
        name, colon, value = line.partition(b":")
        if not colon:
            raise _RefusedError(f"header line {number} without a colon")
        if not _TOKEN.match(name):
            raise _RefusedError(f"header line {number}: the field name is not a token")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise _RefusedError(f"header line {number}: control character in the value")
        headers.append((name, value))
        lname = name.lower()
        if lname == b"content-length":
            if content_length is not None:
                raise _RefusedError("more than one Content-Length")
            if not _DIGITS.match(value):
                raise _RefusedError("Content-Length is not a decimal number")
            content_length = int(value)
        elif lname == b"transfer-encoding":
            te.extend(c.strip(b" \t").lower() for c in value.split(b","))
        elif lname == b"connection":
            connection.update(c.strip(b" \t").lower() for c in value.split(b","))
        elif lname == b"host":
            hosts += 1
        elif lname == b"expect":
            expect = value.lower() == b"100-continue"
        elif lname == b"upgrade":
            upgrade = True
    chunked = False
    if te:
        if te != [b"chunked"]:
            raise _RefusedError(
                "unsupported Transfer-Encoding: only a single 'chunked' is accepted, got "
                f"{len(te)} coding(s)" + ("" if b"chunked" in te else " without 'chunked'")
            )
        if content_length is not None:
            raise _RefusedError("conflicting Content-Length and Transfer-Encoding")
        chunked = True
    return _Fields(headers, content_length, chunked, connection, hosts, expect, upgrade)


@dataclass(slots=True)
class RequestHead:
    raw: bytes
    method: str
    target: str
    version: str  # "1.0" or "1.1"
    headers: list[tuple[bytes, bytes]]
    framing: Framing  # "none", "length" or "chunked"
    content_length: int
    keep_alive: bool
    expect_continue: bool
    upgrade: bool
    request_line_len: int  # bytes of the request line, CRLF included


def parse_request_head(raw: bytes, max_headers: int) -> RequestHead:
    """``raw``: from the first byte of the request to its blank line, inclusive."""
    try:
        lines = _lines(raw)
        fields = _fields(lines[1:], max_headers)
    except _RefusedError as exc:
        raise HttpError(exc.status, exc.detail, exc.kind) from None
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(
            400, f"malformed request line: {len(parts)} parts separated by single spaces, not 3"
        )
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HttpError(400, "malformed request line: the method is not a token")
    if not _TARGET.match(target):
        raise HttpError(400, "malformed request target")
    matched = _VERSION.match(version)
    if matched is None:
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "unsupported HTTP version: only HTTP/1.0 and HTTP/1.1")
        raise HttpError(400, "malformed request line: the version is not HTTP/1.x")
    minor = matched.group(1)
    if minor == b"0" and fields.chunked:
        # RFC 9112 §6.1: a server must treat framing of a 1.0 request with TE as faulty.
        raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request", "smuggling")
    if minor == b"1" and fields.hosts != 1:
        raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
    if fields.chunked:
        framing: Framing = "chunked"
    elif fields.content_length:
        framing = "length"
    else:
        framing = "none"
    if minor == b"1":
        keep_alive = b"close" not in fields.connection
    else:
        keep_alive = b"keep-alive" in fields.connection
    return RequestHead(
        raw=raw,
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version="1." + minor.decode("ascii"),
        headers=fields.headers,
        framing=framing,
        content_length=fields.content_length or 0,
        keep_alive=keep_alive,
        expect_continue=fields.expect_continue and framing != "none",
        upgrade=fields.upgrade and b"upgrade" in fields.connection,
        request_line_len=len(lines[0]) + 2,
    )


@dataclass(slots=True)
class ResponseHead:
    raw: bytes
    status: int
    version: str
    framing: Framing
    content_length: int
    keep_alive: bool


def parse_response_head(raw: bytes, max_headers: int, request_method: str) -> ResponseHead:
    """A response's head and how its body is delimited (RFC 9112 §6.3)."""
    try:
        lines = _lines(raw)
        fields = _fields(lines[1:], max_headers)
    except _RefusedError as exc:
        raise UpstreamError(exc.detail) from None
    matched = _STATUS_LINE.match(lines[0])
    if matched is None:
        raise UpstreamError("malformed status line")
    minor, status_text = matched.group(1), matched.group(2)
    status = int(status_text)
    framing: Framing
    if (
        request_method == "HEAD"
        or 100 <= status < 200
        or status in (204, 304)
        or (request_method == "CONNECT" and 200 <= status < 300)
    ):
        framing = "none"
    elif fields.chunked:
        framing = "chunked"
    elif fields.content_length is not None:
        framing = "length" if fields.content_length else "none"
    else:
        framing = "close"
    if minor == b"1":
        keep_alive = b"close" not in fields.connection
    else:
        keep_alive = b"keep-alive" in fields.connection
    return ResponseHead(
        raw=raw,
        status=status,
        version="1." + minor.decode("ascii"),
        framing=framing,
        content_length=fields.content_length or 0,
        keep_alive=keep_alive and framing != "close",
    )


def parse_chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (CRLF included); extensions are allowed and ignored.
    Raises ValueError for anything else (bare LF, no digits, an overlong size)."""
    matched = _CHUNK_SIZE.match(line)
    if matched is None or b"\n" in matched.group(2) or b"\r" in matched.group(2):
        raise ValueError("bad chunk size line: not hex digits, extensions and CRLF")
    return int(matched.group(1), 16)
