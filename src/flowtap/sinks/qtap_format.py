"""flowtap's records in Qtap's shape (`--output-format qtap`, `format: qtap`): an HTTP
record as Qtap's HTTP transaction artifact, a connection record as Qtap's `connection`
event, so a Qtap user's downstream parsing keeps working.

The field names and their nesting follow Qtap's published examples (docs.qpoint.io:
"Qpoint Data Schema Reference" and "What a Healthy Capture Looks Like") and the
`Connection` struct of Qtap's pkg/services/eventstore; the table of what maps to what, and
what has no equivalent on either side, is in docs/outputs.md. Like Qtap's encoder, empty
fields are left out (Go's omitempty). A record of another type is returned unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowtap.records.connection import Record

# flowtap's request.protocol (the HTTP version line) -> Qtap's l7 protocol names.
_PROTOCOLS = {"HTTP/1.0": "http1", "HTTP/1.1": "http1", "HTTP/2": "http2"}
# Qtap's l7Protocol values; flowtap's tls (TLS seen, plaintext not) is Qtap's other.
_L7 = {"http1", "http2", "dns", "grpc", "other"}


def _compact(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Go's omitempty: no None, "", empty list or mapping (0 and False stay where
    Qtap's own example has them: status, bytes)."""
    return {k: v for k, v in fields.items() if v is not None and v not in ("", [], {})}


def headers_map(pairs: list[list[str]] | None) -> dict[str, str]:
    """Qtap's headers are a name -> value map: a repeated name's values joined with ", "
    (RFC 9110's list form), in the order sent."""
    out: dict[str, str] = {}
    for name, value in pairs or ():
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _host(authority: str | None) -> str | None:
    """The endpoint id Qtap gives a transaction: the authority without its port."""
    if not authority:
        return None
    if authority.startswith("["):  # [v6]:port
        return authority[1 : authority.find("]")]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _message(part: Mapping[str, Any] | None, *, request: bool) -> dict[str, Any] | None:
    if part is None:
        return None
    fields: dict[str, Any]
    if request:
        fields = {
            "method": part.get("method"),
            "url": part.get("url"),
            "scheme": part.get("scheme"),
            "path": part.get("path"),
            "authority": part.get("authority"),
            "protocol": _PROTOCOLS.get(part.get("protocol") or "", part.get("protocol")),
            "user_agent": part.get("user_agent"),
        }
    else:
        fields = {"status": part.get("status"), "content_type": part.get("content_type")}
    fields["headers"] = headers_map(part.get("headers"))
    fields["body"] = part.get("body")  # base64 in both
    return _compact(fields)


def http_transaction(record: Record) -> dict[str, Any]:
    """An `http` record as Qtap's HTTP transaction JSON."""
    process = record.get("process") or {}
    request = record.get("request")
    metadata = {
        "process_id": str(process["pid"]) if process.get("pid") is not None else None,
        "process_exe": process.get("exe"),
        "bytes_sent": record.get("bytes_sent"),
        "bytes_received": record.get("bytes_received"),
        "connection_id": str(record["connection_id"]) if "connection_id" in record else None,
        "endpoint_id": _host(request.get("authority")) if request else None,
    }
    duration = record.get("duration_ms")
    return _compact(
        {
            "metadata": _compact(metadata),
            "request": _message(request, request=True),
            "response": _message(record.get("response"), request=False),
            "transaction_time": record.get("timestamp"),
            "duration_ms": round(duration) if duration is not None else None,
            "direction": record.get("direction"),
        }
    )


def _address(record: Record, side: str) -> dict[str, Any]:
    endpoint = record.get(side) or {}
    return _compact(
        {"family": record.get("family"), "ip": endpoint.get("ip"), "port": endpoint.get("port")}
    )


def connection_event(record: Record) -> dict[str, Any]:
    """A `connection` record (open or close) as Qtap's connection event. The side with the
    process (local) is Qtap's source for egress and its destination for ingress."""
    process = record.get("process") or {}
    local = _compact(
        {
            "address": _address(record, "local"),
            "exe": process.get("exe"),
            "user": process.get("user"),
            "container": _compact({"id": process.get("container_id")}),
        }
    )
    remote = _compact({"address": _address(record, "remote")})
    egress = record.get("direction") != "ingress"
    l7 = record.get("l7_protocol")
    closed = record.get("event") == "close"
    return _compact(
        {
            "meta": _compact(
                {
                    "connectionId": str(record["connection_id"])
                    if "connection_id" in record
                    else None,
                    "endpointId": record.get("sni") or (record.get("remote") or {}).get("ip"),
                }
            ),
            "finalized": closed or None,
            "timestamp": record.get("timestamp"),
            "direction": record.get("direction"),
            "socketProtocol": record.get("socket_protocol"),
            "l7Protocol": (l7 if l7 in _L7 else "other") if l7 else None,
            "source": local if egress else remote,
            "destination": remote if egress else local,
            "bytesReceived": record.get("bytes_received") or None,
            "bytesSent": record.get("bytes_sent") or None,
        }
    )


def to_qtap(record: Record) -> Record:
    kind = record.get("type")
    if kind == "http":
        return http_transaction(record)
    if kind == "connection":
        return connection_event(record)
    return record
