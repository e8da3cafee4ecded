"""Payload reassembly: data events in, HTTP transaction records out.

Each connection's two byte streams are put back in order by position; a jump in position
is a gap (bytes the kernel could not copy), handed to the parser as such. Bytes seen at the
socket and TLS plaintext seen in OpenSSL are separate streams with their own positions. The parser
(HTTP/1.x, or HTTP/2 when the client starts with its preface) yields transactions, which
become records through records/http.py.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from flowtap.events import SOCKET_SOURCE, Conn, Data, Flow, Source
from flowtap.protocols.http1 import Http1Parser
from flowtap.protocols.http2 import Http2Parser
from flowtap.protocols.messages import Side, Transaction
from flowtap.records.connection import Record, WallClock
from flowtap.records.http import ConnectionContext, HttpRecordOptions, http_record
from flowtap.tls import plugins

log = logging.getLogger("flowtap.payloads")

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_STREAMS = 4096

# The capture_source of records, by where the bytes were seen: a TLS plug-in's records
# carry its own name for its source.
_CAPTURE_SOURCES: dict[Source, str] = {SOCKET_SOURCE: "plaintext"} | {
    source: source for source in plugins.sources().values()
}

# Which end of the HTTP exchange each direction of the traced socket is.
_SIDES: dict[tuple[str, Flow], Side] = {
    ("egress", "tx"): "client",
    ("egress", "rx"): "server",
    ("ingress", "tx"): "server",
    ("ingress", "rx"): "client",
}


def _starts_http2(side: Side, data: bytes) -> bool:
    """HTTP/2 from the first bytes seen: the client's preface or, when the server is seen
    first (an HTTP/2 server sends its SETTINGS at once; an HTTP/1 one never speaks
    first), a SETTINGS frame header: type 4 on stream 0."""
    if side == "client":
        return data.startswith(_H2_PREFACE[: len(data)])
    return len(data) >= 9 and data[3] == 0x04 and data[5:9] == b"\0\0\0\0"


@dataclass(slots=True)
class PayloadStats:
    bytes: int = 0
    gaps: int = 0
    gap_bytes: int = 0
    parser_errors: int = 0
    http2_header_limit: int = 0  # of parser_errors: an HTTP/2 header cap was hit
    transactions: int = 0
    unknown_connection: int = 0
    evicted: int = 0


@dataclass(slots=True)
class _Stream:
    ctx: ConnectionContext
    direction: str
    parser: Http1Parser | Http2Parser | None = None
    next_tx: int = 0
    next_rx: int = 0
    failed: bool = False


ConnectionLookup = Callable[[int], tuple[Record, Conn] | None]


class PayloadTracker:
    def __init__(
        self,
        emit: Callable[[Record], None],
        lookup: ConnectionLookup,
        options: HttpRecordOptions,
        *,
        clock: WallClock | None = None,
    ) -> None:
        self._emit = emit
        self._lookup = lookup
        self._options = options
        self._clock = clock or WallClock()
        self._streams: OrderedDict[tuple[int, Source], _Stream] = OrderedDict()
        self.stats = PayloadStats()

    def on_data(self, event: Data) -> None:
        stream = self._stream(event.conn_id, event.source)
        if stream is None or stream.failed:
            return
        side = _SIDES[(stream.direction, event.flow)]
        expected = stream.next_tx if event.flow == "tx" else stream.next_rx
        data = event.data
        if event.position > expected:
            self.stats.gaps += 1
            self.stats.gap_bytes += event.position - expected
            if stream.parser is not None:
                self._handle(stream, stream.parser.gap(side, event.position - expected))
        elif event.position < expected:
            data = data[expected - event.position :]  # already seen
        end = max(expected, event.position + len(event.data))
        if event.flow == "tx":
            stream.next_tx = end
        else:
            stream.next_rx = end
        if not data:
            return
        self.stats.bytes += len(data)
        if stream.parser is None:
            h2 = _starts_http2(side, data)
            # Bodies are only kept when records carry them.
            keep = self._options.max_body_bytes if self._options.level == "full" else 0
            stream.parser = Http2Parser(max_body=keep) if h2 else Http1Parser(max_body=keep)
        self._handle(stream, stream.parser.feed(side, data, event.timestamp_ns))

    def on_close(self, conn_id: int, timestamp_ns: int) -> None:
        """The connection ended: what its parsers still hold becomes records now."""
        for source in _CAPTURE_SOURCES:
            stream = self._streams.pop((conn_id, source), None)
            if stream is not None and stream.parser is not None and not stream.failed:
                self._handle(stream, stream.parser.close(timestamp_ns))

    def _stream(self, conn_id: int, source: Source) -> _Stream | None:
        stream = self._streams.get((conn_id, source))
        if stream is not None:
            return stream
        found = self._lookup(conn_id)
        if found is None:
            self.stats.unknown_connection += 1
            return None
        opened, conn = found
        ctx = ConnectionContext(
            connection_id=conn_id,
            process=opened["process"],
            direction=conn.direction,
            tls=source != SOCKET_SOURCE,
            capture_source=_CAPTURE_SOURCES[source],
        )
        stream = _Stream(ctx=ctx, direction=conn.direction)
        self._streams[(conn_id, source)] = stream
        if len(self._streams) > _MAX_STREAMS:
            (old_id, _), _ = self._streams.popitem(last=False)
            self.stats.evicted += 1
            log.debug("payload state of connection %d evicted", old_id)
        return stream

    def _handle(self, stream: _Stream, transactions: list[Transaction]) -> None:
        for tx in transactions:
            record = http_record(tx, stream.ctx, self._options, self._clock)
            self.stats.transactions += 1
            if record is not None:
                self._emit(record)
        if stream.parser is not None and stream.parser.failed and not stream.failed:
            stream.failed = True
            self.stats.parser_errors += 1
            if isinstance(stream.parser, Http2Parser) and stream.parser.header_limit:
                self.stats.http2_header_limit += 1
            log.debug(
                "connection %d: parser gave up: %s",
                stream.ctx.connection_id,
                stream.parser.failed,
            )
