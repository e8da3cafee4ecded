"""Passive HTTP/2 parser: the two byte streams of one connection in, transactions out.

Sans-IO: the caller feeds what the client sent and what the server sent, each direction in
order, with a timestamp per chunk. Frames are cut with hyperframe; each direction has its
own HPACK decoder (the peer's encoder state), so every header block is decoded, including
those of streams we do not report (pushed streams, late frames on closed streams): skipping
one would desynchronise the dynamic table.

SETTINGS_HEADER_TABLE_SIZE sent by one side bounds the encoder of the other side, i.e. the
decoder of the other direction (RFC 7540 §6.5.2, RFC 7541 §4.2). An increase is allowed at
once (the peer may use it only after it has seen it, and allowing it early is harmless to
a passive observer); a decrease is enforced from the peer's SETTINGS ACK on, because the peer
may still send header blocks encoded under the old limit until it has processed the frame.

The parser gives up on the connection (``failed`` is set, later input is ignored, streams
still open are returned with the failure as their error) on: a missing preface, a first frame
that is not SETTINGS, a frame longer than the receiver's SETTINGS_MAX_FRAME_SIZE (16 KiB until
it advertises more; never more than 16 MiB), a frame or HPACK error, a header block larger
than ``max_header_list``, more than ``max_streams`` open streams, or lost bytes (``gap``). It
never raises out of ``feed``, ``gap`` or ``close``. Memory is bounded: at most one frame
buffered per direction, bodies kept up to ``max_body`` per message, header lists up to
``max_header_list`` per block, ``max_streams`` streams.

Header memory is capped too (an HPACK table bomb: a peer advertising
SETTINGS_HEADER_TABLE_SIZE 2^32-1, then thousands of header blocks): what each decoder's
dynamic table holds at ``max_table_size`` whatever the peer advertised (checked after each
block, so by at most one capped block more), the decoded headers held by open
streams at ``max_header_bytes`` per connection, and both together at a per-process
``HeaderBudget``. Over a cap the parser gives up on the connection with ``header_limit``
set (the caller counts it), never more memory.

Streams reset before any response (a client cancelling, or a rapid-reset flood,
CVE-2023-44487) are not one transaction each: they are summed up in one transaction whose
``count`` says how many, with the first such stream's request, returned when the
connection ends or ``reset_window_ns`` after the first of them.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from hpack import Decoder, HPACKError
from hpack.exceptions import OversizedHeaderListError
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from flowtap.protocols.messages import (
    ParseError,
    Request,
    Response,
    Side,
    Transaction,
)

__all__ = [
    "PREFACE",
    "PROCESS_HEADER_BUDGET",
    "GoAway",
    "HeaderBudget",
    "HeaderLimitError",
    "Http2Parser",
    "error_code_name",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER_LEN = 9
# SETTINGS_MAX_FRAME_SIZE: initial value, and the largest a peer may advertise (the length
# field has 24 bits, so no frame can be 16 MiB or more).
_DEFAULT_MAX_FRAME = 1 << 14
_MAX_FRAME_LEN = (1 << 24) - 1
# Per-message cap on recorded 1xx statuses, and on SETTINGS awaiting their ACK.
_MAX_INFORMATIONAL = 32
_MAX_PENDING_SETTINGS = 16
_MAX_AWAITING_REQUEST = 64  # responses held for a request not seen yet
_HTTP2_VERSION = "2"
_MAX_BLOCK_FRAMING = 1 + 255 + 5  # pad length, padding, priority fields of a HEADERS frame
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1: what one header field costs besides its bytes

_ERROR_CODES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}


class HeaderLimitError(ParseError):
    """A header cap was reached: the parser gives up on the connection (``header_limit``)."""


class HeaderBudget:
    """Header memory (dynamic tables and headers held by open streams) of all the parsers
    of a process: one connection cannot take what the others need."""

    __slots__ = ("_lock", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        # The sensor's parsers and the proxy's (its own thread) share it: a lost update
        # would leak budget for good.
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.used = max(0, self.used - size)


# Shared by every parser of the process (sensor and proxy) unless one is given.
PROCESS_HEADER_BUDGET = HeaderBudget(128 << 20)


def error_code_name(code: int) -> str:
    """RFC 7540 §7 name of an error code, or its hex value when unknown."""
    return _ERROR_CODES.get(code, f"0x{code:x}")


def _other(side: Side) -> Side:
    return "server" if side == "client" else "client"


def _text(raw: bytes) -> str:
    # Header fields are bytes; UTF-8 covers ASCII, anything else stays visible and lossless.
    return raw.decode("utf-8", errors="backslashreplace")


@dataclass(frozen=True, slots=True)
class GoAway:
    """A GOAWAY frame seen on the connection."""

    side: Side  # who sent it
    last_stream_id: int
    error: str  # error code name
    timestamp_ns: int


@dataclass(slots=True)
class _HeaderBlock:
    """A header block being reassembled from HEADERS/PUSH_PROMISE + CONTINUATION frames."""

    stream_id: int
    fragments: bytearray
    end_stream: bool
    start_ns: int
    push: bool  # PUSH_PROMISE: decoded for HPACK state only


@dataclass(slots=True)
class _Stream:
    stream_id: int
    request: Request | None = None
    response: Response | None = None
    informational: list[int] = field(default_factory=list)
    request_done: bool = False
    response_done: bool = False
    request_trailers: bool = False
    response_trailers: bool = False
    header_bytes: int = 0  # decoded header bytes held (charged to the caps)


@dataclass(slots=True)
class _ResetSummary:
    """Streams reset before any response, summed up as one transaction."""

    first: _Stream
    error: str
    start_ns: int
    count: int = 1


def _fields_size(fields: list[tuple[str, str]]) -> int:
    return sum(len(name) + len(value) + _ENTRY_OVERHEAD for name, value in fields)


class Http2Parser:
    """Turns the client and server byte streams of one HTTP/2 connection into transactions."""

    def __init__(
        self,
        *,
        max_body: int = 1 << 20,
        max_header_list: int = 64 << 10,
        max_streams: int = 1000,
        expect_preface: bool = True,
        max_table_size: int = 64 << 10,
        max_header_bytes: int = 2 << 20,
        budget: HeaderBudget | None = None,
        reset_window_ns: int = 10_000_000_000,
    ) -> None:
        self._max_table = max(0, max_table_size)
        self._max_header_bytes = max(0, max_header_bytes)
        self._budget = budget if budget is not None else PROCESS_HEADER_BUDGET
        self._charged = 0  # what this parser holds of the budget
        self._held = 0  # decoded header bytes held by open streams
        # Bytes in each decoder's dynamic table, as charged to the budget.
        self._table_charge: dict[Side, int] = {"client": 0, "server": 0}
        self._reset_window = max(0, reset_window_ns)
        self._resets: _ResetSummary | None = None
        self._header_limit = False
        self._max_body = max(0, max_body)
        self._max_header_list = max(0, max_header_list)
        self._max_streams = max(1, max_streams)
        self._buffers: dict[Side, bytearray] = {"client": bytearray(), "server": bytearray()}
        # Timestamp of the feed that brought the first byte now in each buffer.
        self._buffer_ts: dict[Side, int] = {"client": 0, "server": 0}
        self._preface_pending = expect_preface
        # With the preface, each side's first frame must be SETTINGS (RFC 7540 §3.5).
        self._settings_pending: dict[Side, bool] = {
            "client": expect_preface,
            "server": expect_preface,
        }
        # Largest frame each side may send: what its peer advertised (SETTINGS_MAX_FRAME_SIZE;
        # an increase applies at once). Joining mid-connection, the advertisement may be missed.
        initial_frame = _DEFAULT_MAX_FRAME if expect_preface else _MAX_FRAME_LEN
        self._max_frame: dict[Side, int] = {"client": initial_frame, "server": initial_frame}
        # One decoder per direction: decoders[side] decodes what ``side`` sent.
        self._decoders: dict[Side, Decoder] = {
            "client": Decoder(max_header_list_size=self._max_header_list),
            "server": Decoder(max_header_list_size=self._max_header_list),
        }
        # SETTINGS_HEADER_TABLE_SIZE values sent by a side, waiting for the peer's ACK
        # (None: that SETTINGS frame did not carry the setting).
        self._pending_settings: dict[Side, deque[int | None]] = {
            "client": deque(),
            "server": deque(),
        }
        self._blocks: dict[Side, _HeaderBlock | None] = {"client": None, "server": None}
        self._streams: dict[int, _Stream] = {}
        # Promised (pushed) stream ids, ignored; an insertion-ordered set, bounded.
        self._pushed: dict[int, None] = {}
        self._highest_client_stream = 0
        # Streams whose response is complete but whose request was not seen yet: the two
        # directions come from different calls, and a response may be seen first.
        self._awaiting_request: dict[int, None] = {}
        self._failed: str | None = None
        self.goaway: GoAway | None = None

    @property
    def failed(self) -> str | None:
        """Why the parser gave up on the connection, or None while it still follows it."""
        return self._failed

    @property
    def header_limit(self) -> bool:
        """The parser gave up because a header cap (table, connection, process) was hit."""
        return self._header_limit

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def header_memory(self) -> int:
        """Bytes of header memory charged: held headers and dynamic table allowances."""
        return self._charged

    def __del__(self) -> None:
        # A parser dropped without close() must not keep its share of the process budget.
        self._budget.give(self._charged)
        self._charged = 0

    # -- public API -------------------------------------------------------------------

    def feed(self, side: Side, data: bytes, timestamp_ns: int) -> list[Transaction]:
        """Bytes ``side`` sent, in order; returns the transactions they completed."""
        if self._failed is not None or not data:
            return []
        out: list[Transaction] = []
        try:
            self._feed(side, data, timestamp_ns, out)
            resets = self._resets
            if resets is not None and timestamp_ns - resets.start_ns >= self._reset_window:
                self._flush_resets(out)
        except HeaderLimitError as exc:
            self._header_limit = True
            self._fail(str(exc), out)
        except ParseError as exc:
            self._fail(str(exc), out)
        except HPACKError as exc:
            self._fail(f"hpack: {type(exc).__name__}: {exc}", out)
        except HyperframeError as exc:
            self._fail(f"frame: {type(exc).__name__}: {exc}", out)
        except Exception as exc:  # never raise into the sensor; counted as a failure
            self._fail(f"internal: {type(exc).__name__}: {exc}", out)
        return out

    def skippable(self, side: Side) -> int:
        """Every frame header matters (HPACK, stream state): nothing may be skipped."""
        return 0

    def following(self, side: Side) -> bool:
        """Whether bytes of ``side`` are still parsed."""
        del side
        return self._failed is None

    def gap(self, side: Side, missing: int) -> list[Transaction]:
        """``missing`` bytes of ``side`` were lost: HPACK state is unknown, give up."""
        if self._failed is not None or missing <= 0:
            return []
        out: list[Transaction] = []
        self._fail("gap", out)
        return out

    def close(self, timestamp_ns: int) -> list[Transaction]:
        """The connection ended: streams still open are returned, unfinished."""
        del timestamp_ns  # messages keep the time of their last byte
        out = self._abort_all("connection closed")
        self._buffers = {"client": bytearray(), "server": bytearray()}
        self._blocks = {"client": None, "server": None}
        self._release_all()
        return out

    # -- framing --------------------------------------------------------------------

    def _fail(self, reason: str, out: list[Transaction]) -> None:
        self._failed = reason
        out.extend(self._abort_all(reason))
        self._buffers = {"client": bytearray(), "server": bytearray()}
        self._blocks = {"client": None, "server": None}
        self._pushed.clear()
        self._release_all()

    def _release_all(self) -> None:
        """Give back every byte charged: the parser holds no headers or tables any more."""
        self._budget.give(self._charged)
        self._charged = 0
        self._held = 0
        self._table_charge = {"client": 0, "server": 0}
        # The decoders keep their tables (ignored from now on): drop them.
        self._decoders = {
            "client": Decoder(max_header_list_size=self._max_header_list),
            "server": Decoder(max_header_list_size=self._max_header_list),
        }

    def _abort_all(self, error: str) -> list[Transaction]:
        out: list[Transaction] = []
        self._flush_resets(out)
        out += [
            self._transaction(s, None if s.stream_id in self._awaiting_request else error)
            for s in self._streams.values()
        ]
        for stream_id in list(self._streams):
            self._drop(stream_id)
        self._awaiting_request.clear()
        return out

    # -- header memory ----------------------------------------------------------------

    def _charge(self, size: int) -> None:
        if not self._budget.take(size):
            raise HeaderLimitError(f"process header budget exhausted ({self._budget.limit} bytes)")
        self._charged += size

    def _uncharge(self, size: int) -> None:
        size = min(size, self._charged)
        self._budget.give(size)
        self._charged -= size

    def _hold(self, stream: _Stream, fields: list[tuple[str, str]]) -> None:
        size = _fields_size(fields)
        if self._held + size > self._max_header_bytes:
            raise HeaderLimitError(
                f"headers held by open streams over {self._max_header_bytes} bytes"
            )
        self._charge(size)
        self._held += size
        stream.header_bytes += size

    def _drop(self, stream_id: int) -> _Stream | None:
        """Forget a stream and give back what its headers held."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.header_bytes:
            self._held -= stream.header_bytes
            self._uncharge(stream.header_bytes)
            stream.header_bytes = 0
        return stream

    def _charge_table(self, side: Side) -> None:
        """What the decoder of ``side`` holds in its dynamic table, checked against the cap.

        The table may be *allowed* to grow as large as the peer advertised (clients such as
        python-h2 announce a 4 GiB table as soon as a server offers one, then never fill
        it): what is capped is what it holds, checked after each header block (so it
        overshoots by at most one block, itself capped)."""
        table = self._decoders[side].header_table
        used: int | None = getattr(table, "_current_size", None)  # hpack 4's running total
        if used is None:  # another hpack: count the entries (RFC 7541 §4.1)
            used = sum(len(n) + len(v) + _ENTRY_OVERHEAD for n, v in table.dynamic_entries)
        if used > self._max_table:
            raise HeaderLimitError(f"dynamic table over the {self._max_table}-byte cap")
        delta = used - self._table_charge[side]
        if delta > 0:
            self._charge(delta)
        elif delta < 0:
            self._uncharge(-delta)
        self._table_charge[side] = used

    # -- streams reset before any response ----------------------------------------------

    def _reset(self, stream: _Stream, error: str, ts: int, out: list[Transaction]) -> None:
        if stream.response is not None:
            out.append(self._transaction(stream, error))
            return
        resets = self._resets
        if resets is None:
            self._resets = _ResetSummary(stream, error, ts)
            return
        resets.count += 1
        if resets.error != error:
            resets.error = "reset: mixed error codes"

    def _flush_resets(self, out: list[Transaction]) -> None:
        resets, self._resets = self._resets, None
        if resets is not None:
            tx = self._transaction(resets.first, resets.error)
            tx.count = resets.count
            out.append(tx)

    def _release_awaiting(self, below: int, out: list[Transaction]) -> None:
        """Client streams are opened in increasing order: once the client opened stream
        `below`, a held response on a lower stream will never see its request."""
        for stream_id in [i for i in self._awaiting_request if i < below]:
            del self._awaiting_request[stream_id]
            stream = self._drop(stream_id)
            if stream is not None:
                out.append(self._transaction(stream, None))

    def _feed(self, side: Side, data: bytes, ts: int, out: list[Transaction]) -> None:
        buf = self._buffers[side]
        if not buf:
            self._buffer_ts[side] = ts
        old_len = len(buf)
        old_ts = self._buffer_ts[side]
        buf += data
        pos = 0
        if side == "client" and self._preface_pending:
            have = min(len(buf), len(PREFACE))
            if buf[:have] != PREFACE[:have]:
                raise ParseError("bad preface")
            if have < len(PREFACE):
                return
            self._preface_pending = False
            pos = len(PREFACE)
        while len(buf) - pos >= _FRAME_HEADER_LEN:
            frame, length = Frame.parse_frame_header(
                memoryview(bytes(buf[pos : pos + _FRAME_HEADER_LEN]))
            )
            if length > self._max_frame[side]:
                raise ParseError(f"frame too large: {length} > {self._max_frame[side]}")
            if (
                isinstance(frame, HeadersFrame | PushPromiseFrame | ContinuationFrame)
                and length > self._max_header_list + _MAX_BLOCK_FRAMING
            ):
                # Refused before it is buffered: a peer may allow frames of 16 MiB.
                raise HeaderLimitError("header block too large")
            if self._settings_pending[side]:
                if not isinstance(frame, SettingsFrame) or "ACK" in frame.flags:
                    raise ParseError("first frame is not SETTINGS")
                self._settings_pending[side] = False
            end = pos + _FRAME_HEADER_LEN + length
            if len(buf) < end:
                break
            frame.parse_body(memoryview(bytes(buf[pos + _FRAME_HEADER_LEN : end])))
            start_ns = old_ts if pos < old_len else ts
            pos = end
            self._frame(side, frame, start_ns, ts, out)
        if pos:
            if pos >= old_len:
                self._buffer_ts[side] = ts
            del buf[:pos]

    def _frame(
        self, side: Side, frame: Frame, start_ns: int, ts: int, out: list[Transaction]
    ) -> None:
        block = self._blocks[side]
        if block is not None:
            if not isinstance(frame, ContinuationFrame) or frame.stream_id != block.stream_id:
                raise ParseError("expected CONTINUATION")
            self._add_fragment(block, frame.data)
            if "END_HEADERS" in frame.flags:
                self._blocks[side] = None
                self._header_block(side, block, ts, out)
            return
        if isinstance(frame, HeadersFrame | PushPromiseFrame):
            block = _HeaderBlock(
                stream_id=frame.stream_id,
                fragments=bytearray(),
                end_stream=isinstance(frame, HeadersFrame) and "END_STREAM" in frame.flags,
                start_ns=start_ns,
                push=isinstance(frame, PushPromiseFrame),
            )
            if isinstance(frame, PushPromiseFrame):
                self._remember_push(frame.promised_stream_id)
            self._add_fragment(block, frame.data)
            if "END_HEADERS" in frame.flags:
                self._header_block(side, block, ts, out)
            else:
                self._blocks[side] = block
        elif isinstance(frame, ContinuationFrame):
            raise ParseError("unexpected CONTINUATION")
        elif isinstance(frame, DataFrame):
            self._data(side, frame, ts, out)
        elif isinstance(frame, RstStreamFrame):
            stream = self._drop(frame.stream_id)
            if stream is not None:
                name = error_code_name(frame.error_code)
                self._reset(stream, f"reset: {name}", ts, out)
        elif isinstance(frame, SettingsFrame):
            self._settings(side, frame)
        elif isinstance(frame, GoAwayFrame):
            self._goaway(side, frame, ts, out)
        # PING, PRIORITY, WINDOW_UPDATE, ALTSVC and unknown types change nothing we track.

    def _add_fragment(self, block: _HeaderBlock, fragment: bytes) -> None:
        if len(block.fragments) + len(fragment) > self._max_header_list:
            raise HeaderLimitError("header block too large")
        block.fragments += fragment

    def _remember_push(self, stream_id: int) -> None:
        self._pushed[stream_id] = None
        while len(self._pushed) > self._max_streams:
            del self._pushed[next(iter(self._pushed))]

    # -- connection-level frames ------------------------------------------------------

    def _settings(self, side: Side, frame: SettingsFrame) -> None:
        peer = _other(side)
        if "ACK" in frame.flags:
            # ``side`` acknowledges the peer's oldest unacknowledged SETTINGS: from now on
            # ``side``'s encoder honours it.
            pending = self._pending_settings[peer]
            if pending:
                size = pending.popleft()
                if size is not None:
                    self._decoders[side].max_allowed_table_size = size
            return
        frame_size = frame.settings.get(SettingsFrame.MAX_FRAME_SIZE)
        if frame_size is not None and frame_size > self._max_frame[peer]:
            self._max_frame[peer] = min(frame_size, _MAX_FRAME_LEN)
        size = frame.settings.get(SettingsFrame.HEADER_TABLE_SIZE)
        pending = self._pending_settings[side]
        pending.append(size)
        while len(pending) > _MAX_PENDING_SETTINGS:
            pending.popleft()
        decoder = self._decoders[peer]  # decodes what the peer's encoder produces
        if size is not None and size > decoder.max_allowed_table_size:
            decoder.max_allowed_table_size = size

    def _goaway(self, side: Side, frame: GoAwayFrame, ts: int, out: list[Transaction]) -> None:
        name = error_code_name(frame.error_code)
        self.goaway = GoAway(side, frame.last_stream_id, name, ts)
        # Streams the receiver opened above last_stream_id were not and will not be processed.
        initiated_by_peer = 1 if side == "server" else 0
        for stream_id in list(self._streams):
            if stream_id > frame.last_stream_id and stream_id % 2 == initiated_by_peer:
                stream = self._streams[stream_id]
                self._drop(stream_id)
                out.append(self._transaction(stream, f"goaway: {name}"))

    # -- streams ----------------------------------------------------------------------

    def _header_block(
        self, side: Side, block: _HeaderBlock, ts: int, out: list[Transaction]
    ) -> None:
        # Always decode, whatever happens to the result: the dynamic table depends on it.
        try:
            raw = self._decoders[side].decode(bytes(block.fragments), raw=True)
        except OversizedHeaderListError as exc:
            raise HeaderLimitError("header block too large") from exc
        self._charge_table(side)
        fields = [(_text(bytes(name)).lower(), _text(bytes(value))) for name, value in raw]
        if block.push:
            return
        stream = self._streams.get(block.stream_id)
        if side == "client":
            if stream is None:
                self._release_awaiting(block.stream_id, out)
            stream = self._client_headers(block, stream, fields)
        else:
            stream = self._server_headers(block, stream, fields)
        if stream is None:
            return
        self._hold(stream, fields)
        if block.end_stream:
            self._end_message(side, stream, ts, out)

    def _open(self, stream_id: int) -> _Stream:
        if len(self._streams) >= self._max_streams:
            raise ParseError("too many streams")
        stream = _Stream(stream_id)
        self._streams[stream_id] = stream
        return stream

    def _client_headers(
        self, block: _HeaderBlock, stream: _Stream | None, fields: list[tuple[str, str]]
    ) -> _Stream | None:
        if stream is None:
            if block.stream_id <= self._highest_client_stream or block.stream_id % 2 == 0:
                return None  # a closed or reset stream, or not one a client may open
            self._highest_client_stream = block.stream_id
            stream = self._open(block.stream_id)
        if stream.request is None:
            pseudo = {name: value for name, value in fields if name.startswith(":")}
            headers = [(name, value) for name, value in fields if not name.startswith(":")]
            authority = pseudo.get(":authority")
            if authority is None:
                authority = next((v for n, v in headers if n == "host"), None)
            stream.request = Request(
                method=pseudo.get(":method", ""),
                target=pseudo.get(":path", ""),
                version=_HTTP2_VERSION,
                headers=headers,
                authority=authority,
                scheme=pseudo.get(":scheme"),
                start_ns=block.start_ns,
                end_ns=block.start_ns,
            )
        elif not stream.request_trailers and not stream.request_done:
            stream.request_trailers = True
            stream.request.headers.extend(f for f in fields if not f[0].startswith(":"))
        return stream

    def _server_headers(
        self, block: _HeaderBlock, stream: _Stream | None, fields: list[tuple[str, str]]
    ) -> _Stream | None:
        if stream is None:
            stream_id = block.stream_id
            if (
                stream_id in self._pushed
                or stream_id % 2 == 0
                or stream_id <= self._highest_client_stream
            ):
                return None  # pushed, or a stream already finished or reset
            # A response to a request we never saw (capture began mid-connection).
            self._highest_client_stream = stream_id
            stream = self._open(stream_id)
        if stream.response is None:
            status_text = next((v for n, v in fields if n == ":status"), "")
            try:
                status = int(status_text)
            except ValueError:
                status = 0
            if 100 <= status < 200 and not block.end_stream:
                if len(stream.informational) < _MAX_INFORMATIONAL:
                    stream.informational.append(status)
                return stream
            stream.response = Response(
                status=status,
                reason="",
                version=_HTTP2_VERSION,
                headers=[(n, v) for n, v in fields if not n.startswith(":")],
                start_ns=block.start_ns,
                end_ns=block.start_ns,
                informational=stream.informational,
            )
        elif not stream.response_trailers and not stream.response_done:
            stream.response_trailers = True
            stream.response.headers.extend(f for f in fields if not f[0].startswith(":"))
        return stream

    def _data(self, side: Side, frame: DataFrame, ts: int, out: list[Transaction]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return
        message = stream.request if side == "client" else stream.response
        done = stream.request_done if side == "client" else stream.response_done
        if message is None or done:
            return
        body = message.body
        body.size += len(frame.data)
        room = self._max_body - len(body.data)
        if room > 0:
            body.data += frame.data[:room]
        body.truncated = len(body.data) < body.size
        message.end_ns = ts
        if "END_STREAM" in frame.flags:
            self._end_message(side, stream, ts, out)

    def _end_message(self, side: Side, stream: _Stream, ts: int, out: list[Transaction]) -> None:
        if side == "client":
            stream.request_done = True
            if stream.request is not None:
                stream.request.end_ns = ts
        else:
            stream.response_done = True
            if stream.response is not None:
                stream.response.end_ns = ts
        if side == "server" and stream.request is None and not stream.request_done:
            # Its request may still come from the other direction: hold it (bounded).
            self._awaiting_request[stream.stream_id] = None
            while len(self._awaiting_request) > _MAX_AWAITING_REQUEST:
                oldest = next(iter(self._awaiting_request))
                self._release_awaiting(oldest + 1, out)
            return
        if side == "client":
            self._awaiting_request.pop(stream.stream_id, None)
        request_finished = stream.request_done or stream.request is None
        if request_finished and stream.response_done:
            self._drop(stream.stream_id)
            error = None if stream.response is not None else "no final response"
            out.append(self._transaction(stream, error))

    @staticmethod
    def _transaction(stream: _Stream, error: str | None) -> Transaction:
        return Transaction(
            request=stream.request,
            response=stream.response,
            stream_id=stream.stream_id,
            error=error,
        )
