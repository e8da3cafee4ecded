"""Records from what the egress proxy reports: the same ``http`` records as the uprobes
produce (capture_source "egress"), and a connection record per proxied connection."""

from __future__ import annotations

from flowtap.events import Endpoint
from flowtap.protocols.messages import Transaction
from flowtap.proxy.events import ConnectionEvent, ProxyContext
from flowtap.records.connection import Record, WallClock
from flowtap.records.http import ConnectionContext, HttpRecordOptions, http_record
from flowtap.records.model import (
    ConnectionRecord,
    EgressDetail,
    Process,
    connection_close,
    connection_open,
    to_dict,
)
from flowtap.records.policy import CapturePolicy

__all__ = [
    "CAPTURE_SOURCE",
    "connection_context",
    "egress_connection_record",
    "egress_connection_value",
    "egress_http_record",
]

CAPTURE_SOURCE = "egress"


def connection_context(ctx: ProxyContext, process: Record) -> ConnectionContext:
    """The records' view of a proxied connection: the client process is the traced one,
    and it is the client of the exchange."""
    return ConnectionContext(
        connection_id=ctx.connection_id,
        process=process,
        direction="egress",
        tls=ctx.tls,
        capture_source=CAPTURE_SOURCE,
        remote_ip=ctx.destination[0],
        remote_port=ctx.destination[1],
        sni=ctx.sni,
    )


def egress_http_record(
    tx: Transaction,
    ctx: ProxyContext,
    process: Record,
    options: HttpRecordOptions,
    clock: WallClock,
    *,
    policy: CapturePolicy | None = None,
) -> Record | None:
    """The ``http`` record of one proxied transaction (None at capture level none);
    ``process`` is the client process as ``process_record`` makes it."""
    context = connection_context(ctx, process)
    if policy is not None:
        options = policy.options_for(tx, context)
    return http_record(tx, context, options, clock)


def _family(ip: str) -> str:
    return "ipv6" if ":" in ip else "ipv4"


def egress_connection_value(
    event: ConnectionEvent, process: Process | Record, clock: WallClock
) -> ConnectionRecord:
    """A connection record for a proxied connection, built like the kernel's connection
    records (local: the client's end, remote: the original destination), plus what the
    proxy did (``egress``). The close record carries bytes, duration, outcome and SNI."""
    ctx = event.context
    host, port = ctx.destination
    opened = connection_open(
        ctx.connection_id,
        clock.rfc3339(event.timestamp_ns),
        process,
        family=_family(ctx.client[0]),
        socket_protocol="tcp",
        direction="egress",
        local=Endpoint(ctx.client[0], ctx.client[1]),
        remote=Endpoint(host, port),
        state="established",
        error=None,
        capture_source=CAPTURE_SOURCE,
    )
    if event.event == "open":
        return opened
    return connection_close(
        opened,
        opened.timestamp,
        local=opened.local,
        remote=opened.remote,
        bytes_sent=event.bytes_from_client,
        bytes_received=event.bytes_to_client,
        duration_ns=max(event.timestamp_ns - ctx.started_ns, 0),
        status="failed" if event.outcome in ("upstream_failed", "rejected") else "closed",
        error=None,  # errno names only, as in the kernel's records: the detail is below
        l7_protocol=ctx.l7_protocol,
        sni=ctx.sni,
        egress=EgressDetail(
            mode=ctx.mode,
            outcome=event.outcome,
            tls=ctx.tls,
            alpn=ctx.alpn,
            detail=event.error,
        ),
    )


def egress_connection_record(event: ConnectionEvent, process: Record, clock: WallClock) -> Record:
    """egress_connection_value, serialized."""
    return to_dict(egress_connection_value(event, process, clock))
