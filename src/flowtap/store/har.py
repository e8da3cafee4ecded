"""HTTP transaction records as a HAR 1.2 log (http://www.softwareishard.com/blog/har-12-spec/),
the file browsers' developer tools open. Bodies are kept as captured: a text body as text,
any other as base64 (the spec's content.encoding; for a request body, `_encoding`, a custom
field, as postData has none). flowtap's own facts go in custom `_` fields."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from flowtap import __version__

Record = dict[str, Any]


def _pairs(headers: list[list[str]] | None) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in headers or []]


def _body(encoded: str) -> tuple[str, bool]:
    """(text, is_base64): the captured body as text if it is UTF-8, else base64."""
    raw = base64.b64decode(encoded)
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return encoded, True


def _request(request: Record) -> dict[str, Any]:
    url = request["url"]
    out: dict[str, Any] = {
        "method": request["method"],
        "url": url,
        "httpVersion": request["protocol"],
        "cookies": [],
        "headers": _pairs(request.get("headers")),
        "queryString": [
            {"name": k, "value": v}
            for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)
        ],
        "headersSize": -1,
        "bodySize": request["body_size"],
    }
    if request.get("body"):
        text, encoded = _body(request["body"])
        post: dict[str, Any] = {"mimeType": request.get("content_type") or "", "text": text}
        if encoded:
            post["_encoding"] = "base64"
        out["postData"] = post
    return out


def _response(response: Record | None, protocol: str) -> dict[str, Any]:
    if response is None:  # no response seen: what browsers write for an aborted request
        return {
            "status": 0,
            "statusText": "",
            "httpVersion": protocol,
            "cookies": [],
            "headers": [],
            "content": {"size": 0, "mimeType": ""},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
        }
    content: dict[str, Any] = {
        "size": response["body_size"],
        "mimeType": response.get("content_type") or "",
    }
    if response.get("body"):
        text, encoded = _body(response["body"])
        content["text"] = text
        if encoded:
            content["encoding"] = "base64"
    location = next((v for k, v in response.get("headers", []) if k.lower() == "location"), "")
    return {
        "status": response["status"],
        "statusText": response.get("reason", ""),
        "httpVersion": protocol,
        "cookies": [],
        "headers": _pairs(response.get("headers")),
        "content": content,
        "redirectURL": location,
        "headersSize": -1,
        "bodySize": response["body_size"],
    }


def entry(record: Record) -> dict[str, Any] | None:
    """One HAR entry; None for a transaction whose request was not seen (HAR needs one)."""
    request = record.get("request")
    if request is None:
        return None
    duration = float(record["duration_ms"])
    proc = record["process"]
    return {
        "startedDateTime": record["timestamp"],
        "time": duration,
        "request": _request(request),
        "response": _response(record.get("response"), request["protocol"]),
        "cache": {},
        # Only the whole is measured: first request byte to last response byte.
        "timings": {"send": 0, "wait": duration, "receive": 0},
        "connection": str(record["connection_id"]),
        "_process": {"pid": proc["pid"], "comm": proc["comm"], "exe": proc.get("exe")},
        "_error": record.get("error"),
    }


def har(records: Iterable[Record]) -> dict[str, Any]:
    entries = [e for e in (entry(r) for r in records) if e is not None]
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "flowtap", "version": __version__},
            "entries": entries,
        }
    }
