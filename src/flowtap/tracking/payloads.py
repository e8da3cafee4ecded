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
from flowtap.records.model import ConnectionRecord, process_json
from flowtap.records.policy import CapturePolicy
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


# A body's rest is worth a word to the kernel (a map update) only when it is this long.
_MIN_SKIP = 64 << 10


@dataclass(slots=True)
class PayloadStats:
    bytes: int = 0
    skipped_bytes: int = 0  # not copied by the kernel, as asked: past the body cap
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
    # Positions before which the kernel was asked not to copy (this stream's positions).
    skip_tx: int = 0
    skip_rx: int = 0


# A connection's open record (typed, or serialized) and identity, if it is reported.
ConnectionLookup = Callable[[int], tuple[ConnectionRecord | Record, Conn] | None]
# Tells the kernel not to copy a connection's socket bytes before these positions
# (tx, rx); (0, 0) when the connection is over.
SkipWriter = Callable[[int, int, int], None]


class PayloadTracker:
    def __init__(
        self,
        emit: Callable[[Record], None],
        lookup: ConnectionLookup,
        options: HttpRecordOptions,
        *,
        clock: WallClock | None = None,
        policy: CapturePolicy | None = None,
        skip: SkipWriter | None = None,
    ) -> None:
        self._emit = emit
        self._lookup = lookup
        self._skip = skip
        self._options = options
        self._policy = policy
        self._clock = clock or WallClock()
        self._streams: OrderedDict[tuple[int, Source], _Stream] = OrderedDict()
        self.stats = PayloadStats()

    def set_policy(self, policy: CapturePolicy) -> None:
        """A reloaded configuration: every transaction completed from now on uses it."""
        self._policy = policy

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
        end = max(expected, event.position + len(event.data) + event.skipped)
        if event.flow == "tx":
            stream.next_tx = end
        else:
            stream.next_rx = end
        if event.skipped:
            # Bytes the parser said it would not keep: counted, as a hole in a body.
            skipped = end - max(expected, event.position)
            self.stats.skipped_bytes += skipped
            if stream.parser is not None and skipped > 0:
                self._handle(stream, stream.parser.gap(side, skipped))
            return
        if not data:
            return
        self.stats.bytes += len(data)
        if stream.parser is None:
            h2 = _starts_http2(side, data)
            # Bodies are only kept when records carry them.
            level = self._policy.highest_level if self._policy else self._options.level
            keep = self._options.max_body_bytes if level == "full" else 0
            stream.parser = Http2Parser(max_body=keep) if h2 else Http1Parser(max_body=keep)
        self._handle(stream, stream.parser.feed(side, data, event.timestamp_ns))
        # Socket bytes only: a skip in the TLS probes made their verification (at every
        # start) three times slower, 0.7 s to 2.2 s here, for bodies that are rarely huge.
        if event.source == SOCKET_SOURCE:
            self._ask_skip(event.conn_id, stream, event.flow)

    def _ask_skip(self, conn_id: int, stream: _Stream, flow: Flow) -> None:
        """A body past the cap: the kernel stops copying it and sends its length only."""
        if self._skip is None or stream.parser is None or stream.failed:
            return
        skippable = stream.parser.skippable(_SIDES[(stream.direction, flow)])
        if skippable < _MIN_SKIP:
            return
        before = (stream.skip_tx, stream.skip_rx)
        if flow == "tx":
            stream.skip_tx = stream.next_tx + skippable
        else:
            stream.skip_rx = stream.next_rx + skippable
        if (stream.skip_tx, stream.skip_rx) != before:  # once per body, not per event
            self._skip(conn_id, stream.skip_tx, stream.skip_rx)

    def on_close(
        self, conn_id: int, timestamp_ns: int, *, sent: int = 0, received: int = 0
    ) -> None:
        """The connection ended: what its parsers still hold becomes records now.
        sent and received are its socket byte counts: socket bytes past the last ones
        seen were lost (no later event shows that gap), and a body they end is complete."""
        for source in _CAPTURE_SOURCES:
            stream = self._streams.pop((conn_id, source), None)
            if stream is None:
                continue
            if source == SOCKET_SOURCE:
                self._trailing_gap(stream, "tx", sent - stream.next_tx)
                self._trailing_gap(stream, "rx", received - stream.next_rx)
            if stream.parser is not None and not stream.failed:
                self._handle(stream, stream.parser.close(timestamp_ns))
            if self._skip is not None and (stream.skip_tx or stream.skip_rx):
                self._skip(conn_id, 0, 0)

    def _trailing_gap(self, stream: _Stream, flow: Flow, missing: int) -> None:
        """Socket bytes past the last seen: lost, unless the parser no longer follows that
        direction (a CONNECT tunnel, an upgrade: the kernel stops copying a TLS socket)."""
        if missing <= 0 or stream.parser is None or stream.failed:
            return
        side = _SIDES[(stream.direction, flow)]
        if not stream.parser.following(side):
            return
        self.stats.gaps += 1
        self.stats.gap_bytes += missing
        self._handle(stream, stream.parser.gap(side, missing))

    def _stream(self, conn_id: int, source: Source) -> _Stream | None:
        stream = self._streams.get((conn_id, source))
        if stream is not None:
            return stream
        found = self._lookup(conn_id)
        if found is None:
            self.stats.unknown_connection += 1
            return None
        opened, conn = found
        process = opened.process if isinstance(opened, ConnectionRecord) else opened["process"]
        ctx = ConnectionContext(
            connection_id=conn_id,
            process=process_json(process),
            direction=conn.direction,
            tls=source != SOCKET_SOURCE,
            capture_source=_CAPTURE_SOURCES[source],
            remote_ip=conn.remote.ip,
            remote_port=conn.remote.port,
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
            options = self._policy.options_for(tx, stream.ctx) if self._policy else self._options
            record = http_record(tx, stream.ctx, options, self._clock)
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
