"""Passive HTTP/1.x parsing of one connection's two byte streams (sans-IO).

Bytes in, transactions out: the caller feeds what the client sent and what the server sent,
each direction in order, and gets back the request/response pairs completed by that input.
llhttp (through httptools) parses each direction; this module pairs the messages, keeps
bodies up to a cap and bounds every buffer.

How the bytes reach llhttp
--------------------------
Every message is made to end exactly at the end of a piece handed to ``feed_data``:

* a header section is fed whole when it is all there (up to its blank line), else one
  line at a time (a line ends at ``\\n``); either way the header budget is counted
  before llhttp (and httptools, which joins a header's pieces) holds the bytes;
* a Content-Length body is fed exactly its remaining length;
* a chunked body is fed chunk-size line, then chunk data plus CRLF, then the trailer lines;
* only a close-delimited response body (no length: it ends at close) is fed as it comes.

Because of that, the parser can act between two messages:

* **HEAD** (and a 2xx to CONNECT): llhttp's response parser cannot know the request method,
  and httptools offers no hook to tell it "no body" (its ``on_headers_complete`` return value
  is fixed). When the response paired with a HEAD request has its headers complete, the
  response is finished right there, and the response parser is replaced by a fresh one for
  the next byte (which is the next response's first byte, since the header section was fed
  line by line).
* **Trailers**: httptools keeps the last trailer field of a chunked message and would hand
  it to the next message as a header; a fresh parser is used after each chunked message.

Upgrade and CONNECT: once the 101 (or the 2xx to CONNECT) is seen, the transaction is
returned and both directions stop (what follows is another protocol). Until that response,
client bytes sent after the Upgrade/CONNECT request are held (at most ``max_header_bytes``)
and parsed as HTTP/1.x again if the server refuses.

``Content-Encoding`` (gzip, ...) is left in the headers; bodies are kept as sent.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from flowtap.protocols.messages import Body, ParseError, Request, Response, Side, Transaction

__all__ = ["Http1Parser"]

# 1xx responses remembered before a final response (a server could send them forever).
_MAX_INFORMATIONAL = 32
_HEX = re.compile(rb"[0-9A-Fa-f]+")
# What a message's first bytes look like, to go on after lost bytes.
_MESSAGE_START: dict[Side, re.Pattern[bytes]] = {
    "client": re.compile(rb"[A-Z][A-Z-]{2,15} [!-~]+ HTTP/1\.[01]\r?\n"),
    "server": re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9][ \r]"),
}
_FILLER = bytes(64 << 10)  # stand-in for lost body bytes
# A response body that ends at close has no known end: everything after is its.
_UNTIL_CLOSE = 1 << 62

_Parser = httptools.HttpRequestParser | httptools.HttpResponseParser


@dataclass(slots=True, eq=False)
class _Entry:
    """A transaction being assembled."""

    request: Request | None
    response: Response | None = None
    request_done: bool = False
    response_done: bool = False
    error: str | None = None

    def transaction(self) -> Transaction:
        return Transaction(request=self.request, response=self.response, error=self.error)


@dataclass(slots=True)
class _Stream:
    """One direction's parsing state."""

    side: Side
    parser: _Parser
    stopped: str | None = None  # why this direction is no longer parsed
    reset_pending: bool = False  # use a fresh llhttp parser before the next byte
    ignore: bool = False  # callbacks from the current llhttp parser are stale
    last_ns: int = 0  # timestamp of the last byte fed
    # The message in progress.
    started: bool = False
    in_headers: bool = True
    start_ns: int = 0
    header_bytes: int = 0  # bytes of the header section fed so far
    header_count: int = 0
    first_line: bytearray = field(default_factory=bytearray)  # target or reason
    headers: list[tuple[str, str]] = field(default_factory=list)
    informational: bool = False  # a 1xx response (not 101)
    # Framing of the body in progress, so each message ends at the end of a piece.
    content_left: int | None = None
    chunked: bool = False
    chunk_left: int = 0  # chunk data + CRLF still to feed
    chunk_line: bytearray = field(default_factory=bytearray)  # a chunk-size line so far
    in_trailer: bool = False
    # Client bytes after an Upgrade/CONNECT request, until the server answers.
    held: bytearray | None = None
    held_overflow: bool = False
    body_hole: bool = False  # bytes of this body were lost: the rest is counted, not kept

    def new_message(self) -> None:
        self.started = False
        self.in_headers = True
        self.header_bytes = 0
        self.header_count = 0
        self.first_line = bytearray()
        self.headers = []
        self.informational = False
        self.content_left = None
        self.chunked = False
        self.chunk_left = 0
        self.chunk_line = bytearray()
        self.in_trailer = False
        self.body_hole = False


class _Callbacks:
    """The object httptools calls into, for one direction."""

    __slots__ = ("_owner", "_side")

    def __init__(self, owner: Http1Parser, side: Side) -> None:
        self._owner = owner
        self._side = side

    def on_message_begin(self) -> None:
        self._owner._on_message_begin(self._side)

    def on_url(self, url: bytes) -> None:
        self._owner._on_first_line(self._side, url)

    def on_status(self, status: bytes) -> None:
        self._owner._on_first_line(self._side, status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._owner._on_header(self._side, name, value)

    def on_headers_complete(self) -> None:
        self._owner._on_headers_complete(self._side)

    def on_body(self, body: bytes) -> None:
        self._owner._on_body(self._side, body)

    def on_message_complete(self) -> None:
        self._owner._on_message_complete(self._side)


def _whole_head_end(data: bytes, pos: int) -> int:
    """Where a header section that starts at pos and is here whole ends (after its blank
    line); 0 when it is not here whole, or has bare-LF lines that could end it sooner."""
    blank = data.find(b"\r\n\r\n", pos)
    if blank < 0:
        return 0
    first_end = data.find(b"\n\n", pos, blank + 4)
    lf_crlf = data.find(b"\n\r\n", pos, blank + 4)
    if first_end >= 0 or lf_crlf != blank + 1:
        return 0
    return blank + 4


class Http1Parser:
    """Both directions of one HTTP/1.x connection, parsed passively.

    ``max_pending`` bounds the requests waiting for a response; past it, the oldest is
    returned with error "no response".
    """

    def __init__(
        self,
        *,
        max_body: int = 1 << 20,
        max_header_bytes: int = 64 << 10,
        max_headers: int = 256,
        max_pending: int = 64,
    ) -> None:
        self.max_body = max_body
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_pending = max(1, max_pending)
        self._failed: str | None = None
        self._closed = False
        self._error: str | None = None  # a ParseError raised inside a callback
        self._now = 0
        self._out: list[Transaction] = []
        self._entries: list[_Entry] = []  # not yet returned, in order of creation
        self._unanswered: deque[_Entry] = deque()  # requests waiting for a response
        self._cur_req: _Entry | None = None
        self._cur_resp: _Entry | None = None
        self._informational: list[int] = []
        self._upgrade_entry: _Entry | None = None
        self._resume_client = False
        self._streams: dict[Side, _Stream] = {
            "client": _Stream("client", self._new_parser("client")),
            "server": _Stream("server", self._new_parser("server")),
        }

    @property
    def failed(self) -> str | None:
        """Why the parser gave up, or None."""
        return self._failed

    def following(self, side: Side) -> bool:
        """Whether bytes of ``side`` are still parsed (not after a tunnel, an upgrade,
        a failure or a gap it waits to resync after): a lost tail matters only then."""
        return self._failed is None and not self._closed and self._streams[side].stopped is None

    # -- public API -------------------------------------------------------------------

    def feed(self, side: Side, data: bytes, timestamp_ns: int) -> list[Transaction]:
        """Bytes ``side`` sent, in order; returns the transactions they complete."""
        if self._failed is not None or self._closed or not data:
            return []
        self._now = timestamp_ns
        st = self._streams[side]
        if st.stopped == "gap" and _MESSAGE_START[side].match(data):
            self._resync(st)
        self._guard(lambda: self._feed_stream(st, bytes(data)))
        return self._take()

    def gap(self, side: Side, missing: int) -> list[Transaction]:
        """``missing`` bytes ``side`` sent were lost. Inside a body of known length they
        are skipped (the body is flagged truncated); otherwise the message in progress is
        given up, and that side waits for the start of a message to go on."""
        st = self._streams[side]
        if self._failed is not None or self._closed or st.stopped is not None:
            return []
        if self._skippable(st, missing):
            self._guard(lambda: self._skip(st, missing))
            return self._take()
        st.stopped = "gap"
        if side == "client":
            st.held = None
            entry = self._cur_req
            self._cur_req = None
            if entry is not None:
                entry.error = "gap"
                entry.request_done = True
                if entry.response_done:
                    self._emit(entry)
            elif st.started:
                # A request began but its head was lost: hold its place so that its response
                # is not paired with the next request.
                placeholder = _Entry(request=None, request_done=True, error="gap")
                self._entries.append(placeholder)
                self._queue(placeholder)
        else:
            entry = self._cur_resp
            self._cur_resp = None
            if entry is None and st.started and not st.informational and self._unanswered:
                entry = self._unanswered.popleft()
            if entry is not None:
                entry.error = "gap"
                self._emit(entry)
        return self._take()

    def skippable(self, side: Side) -> int:
        """How many of ``side``'s next bytes the records would not keep: the rest of a
        body that holds ``max_body`` bytes already (they may then come as a gap, and
        body sizes stay exact). 0 when the next bytes matter or their framing is unknown."""
        st = self._streams[side]
        if self._failed is not None or self._closed or st.stopped is not None or st.ignore:
            return 0
        if st.in_headers or st.in_trailer or st.held is not None or st.reset_pending:
            return 0
        entry = self._cur_req if side == "client" else self._cur_resp
        message = None
        if entry is not None:
            message = entry.request if side == "client" else entry.response
        if message is not None and len(message.body.data) < self.max_body and not st.body_hole:
            return 0
        if st.chunked:
            return max(st.chunk_left - 2, 0)  # the chunk's CRLF must be seen
        if self._until_close(st):
            return _UNTIL_CLOSE
        return st.content_left or 0

    def _until_close(self, st: _Stream) -> bool:
        """A response body that ends when the connection does (no length, not chunked)."""
        return st.side == "server" and st.content_left is None and self._cur_resp is not None

    def _skippable(self, st: _Stream, missing: int) -> bool:
        if st.in_headers or st.in_trailer or st.held is not None or st.reset_pending:
            return False
        if st.chunked:
            return 0 < missing <= st.chunk_left - 2  # the chunk's CRLF must be seen
        if self._until_close(st):
            return missing > 0
        return st.content_left is not None and 0 < missing <= st.content_left

    def _skip(self, st: _Stream, missing: int) -> None:
        """Feeds llhttp stand-in bytes for a hole in a body, keeping none of them."""
        st.body_hole = True
        left = missing
        while left > 0 and st.stopped is None and self._failed is None:
            step = min(left, len(_FILLER))
            self._feed_stream(st, _FILLER[:step])
            left -= step

    def _resync(self, st: _Stream) -> None:
        """A side that lost bytes goes on at what looks like a message's first line."""
        st.stopped = None
        st.held = None
        self._reset(st)
        if st.side == "server":
            # Without pipelining one request waits for this response: the latest. Those
            # before it lost their responses in the gap.
            while len(self._unanswered) > 1:
                entry = self._unanswered.popleft()
                entry.error = entry.error or "gap"
                entry.response_done = True
                if entry.request_done:
                    self._emit(entry)

    def close(self, timestamp_ns: int) -> list[Transaction]:
        """End of the connection: close-delimited bodies end, the rest is returned."""
        if self._closed:
            return []
        self._closed = True
        server = self._streams["server"]
        entry = self._cur_resp
        if entry is not None and not entry.response_done:
            if (
                self._failed is None
                and server.stopped is None
                and not server.in_headers
                and not server.chunked
                and server.content_left is None
                and entry.response is not None
            ):
                entry.response_done = True
                entry.response.end_ns = server.last_ns or timestamp_ns
            elif entry.error is None:
                entry.error = "incomplete response"
        self._cur_resp = None
        for entry in list(self._entries):
            if entry.error is None:
                if entry.response is None:
                    entry.error = "no response"
                elif not entry.request_done:
                    entry.error = "incomplete request"
            self._emit(entry)
        self._unanswered.clear()
        self._cur_req = None
        return self._take()

    # -- feeding ----------------------------------------------------------------------

    def _guard(self, work: Callable[[], None]) -> None:
        """Run ``work``; any failure stops the parser, nothing is raised."""
        try:
            work()
        except ParseError as exc:
            self._fail(str(exc))
        except httptools.HttpParserError as exc:
            self._fail(self._error or f"llhttp: {exc}")
        except Exception as exc:  # never raise out of the parser
            self._fail(self._error or f"internal: {exc!r}")

    def _fail(self, reason: str) -> None:
        if self._failed is None:
            self._failed = reason

    def _new_parser(self, side: Side) -> _Parser:
        if side == "client":
            return httptools.HttpRequestParser(_Callbacks(self, side))
        return httptools.HttpResponseParser(_Callbacks(self, side))

    def _reset(self, st: _Stream) -> None:
        st.parser = self._new_parser(st.side)
        st.reset_pending = False
        st.ignore = False
        st.new_message()

    def _feed_stream(self, st: _Stream, data: bytes) -> None:
        n = len(data)
        view = memoryview(data)
        pos = 0
        if st.stopped is None and st.held is None:
            st.last_ns = self._now
        while pos < n and st.stopped is None and self._failed is None:
            if st.held is not None:
                self._hold(st, view[pos:])
                return
            if st.reset_pending:
                self._reset(st)
            end = self._piece_end(st, data, pos)
            try:
                st.parser.feed_data(view[pos:end])
            except httptools.HttpParserUpgrade as exc:
                self._on_upgrade(st, view[pos + int(exc.args[0]) :])
                return
            except httptools.HttpParserError:
                if st.stopped is not None and self._error is None:
                    return  # llhttp pausing at a tunnel we already handled
                raise
            pos = end
            if self._resume_client:
                self._resume_client = False
                self._resume_after_refused_upgrade()

    def _piece_end(self, st: _Stream, data: bytes, pos: int) -> int:
        """Where the next piece for llhttp ends, so that no message ends inside a piece."""
        n = len(data)
        if st.in_headers and not st.header_bytes:
            end = _whole_head_end(data, pos)
            if end and end - pos <= self.max_header_bytes:
                st.header_bytes = end - pos
                return end
        if st.in_headers or st.in_trailer:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            st.header_bytes += end - pos
            if st.header_bytes > self.max_header_bytes:
                raise ParseError(f"header section over {self.max_header_bytes} bytes")
            return end
        if st.chunked:
            if st.chunk_left > 0:
                end = min(n, pos + st.chunk_left)
                st.chunk_left -= end - pos
                return end
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            st.chunk_line += data[pos:end]
            if len(st.chunk_line) > self.max_header_bytes:
                raise ParseError("chunk-size line too long")
            if nl >= 0:
                size_text = bytes(st.chunk_line).split(b";", 1)[0].strip()
                st.chunk_line = bytearray()
                if _HEX.fullmatch(size_text):
                    size = int(size_text, 16)
                    if size == 0:
                        st.in_trailer = True
                        st.header_bytes = 0
                    else:
                        st.chunk_left = size + 2  # the data and its CRLF
                # Otherwise llhttp reports the malformed line.
            return end
        if st.content_left is not None and st.content_left > 0:
            end = min(n, pos + st.content_left)
            st.content_left -= end - pos
            return end
        return n

    def _hold(self, st: _Stream, data: memoryview) -> None:
        """Keep client bytes sent after an Upgrade/CONNECT request, within bounds."""
        if st.held is None or st.held_overflow:
            return
        if len(st.held) + len(data) > self.max_header_bytes:
            st.held = bytearray()
            st.held_overflow = True
        else:
            st.held += data

    def _on_upgrade(self, st: _Stream, rest: memoryview) -> None:
        if st.side == "server":
            st.stopped = st.stopped or "upgrade"
            return
        # The request completed already; wait for the server's answer.
        st.held = bytearray()
        st.held_overflow = False
        st.reset_pending = True
        self._hold(st, rest)

    def _resume_after_refused_upgrade(self) -> None:
        st = self._streams["client"]
        held, overflow = st.held, st.held_overflow
        st.held = None
        if st.stopped is not None or held is None:
            return
        if overflow:
            st.stopped = "lost sync after refused upgrade"
            return
        self._reset(st)
        now, self._now = self._now, st.last_ns
        try:
            self._feed_stream(st, bytes(held))
        finally:
            self._now = now

    # -- llhttp callbacks -------------------------------------------------------------

    def _raise(self, reason: str) -> None:
        self._error = reason
        raise ParseError(reason)

    def _on_message_begin(self, side: Side) -> None:
        st = self._streams[side]
        if st.ignore:
            return
        st.started = True
        st.start_ns = self._now

    def _on_first_line(self, side: Side, part: bytes) -> None:
        st = self._streams[side]
        if st.ignore:
            return
        st.first_line += part
        if len(st.first_line) > self.max_header_bytes:
            self._raise(f"header section over {self.max_header_bytes} bytes")

    def _on_header(self, side: Side, name: bytes, value: bytes) -> None:
        st = self._streams[side]
        if st.ignore or not st.in_headers:
            return  # trailers are not kept
        st.header_count += 1
        if st.header_count > self.max_headers:
            self._raise(f"more than {self.max_headers} headers")
        st.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def _on_headers_complete(self, side: Side) -> None:
        st = self._streams[side]
        if st.ignore:
            return
        st.in_headers = False
        self._set_framing(st)
        if side == "client":
            self._request_head(st)
        else:
            self._response_head(st)

    def _set_framing(self, st: _Stream) -> None:
        content_length: int | None = None
        for name, value in st.headers:
            lname = name.lower()
            if lname == "transfer-encoding":
                last = value.rsplit(",", 1)[-1].strip().lower()
                st.chunked = last == "chunked"
            elif lname == "content-length":
                text = value.strip()
                content_length = int(text) if text.isdigit() else None
        st.content_left = None if st.chunked else content_length

    def _request_head(self, st: _Stream) -> None:
        parser = st.parser
        assert isinstance(parser, httptools.HttpRequestParser)
        method = parser.get_method().decode("latin-1")
        authority = next((v for k, v in st.headers if k.lower() == "host"), None)
        request = Request(
            method=method,
            target=st.first_line.decode("latin-1"),
            version=parser.get_http_version(),
            headers=st.headers,
            authority=authority,
            body=Body(),
            start_ns=st.start_ns,
        )
        entry = _Entry(request=request)
        self._entries.append(entry)
        self._cur_req = entry
        self._queue(entry)
        if method == "CONNECT" or parser.should_upgrade():
            self._upgrade_entry = entry

    def _queue(self, entry: _Entry) -> None:
        self._unanswered.append(entry)
        while len(self._unanswered) > self.max_pending:
            oldest = self._unanswered.popleft()
            oldest.error = "no response"
            self._emit(oldest)

    def _response_head(self, st: _Stream) -> None:
        parser = st.parser
        assert isinstance(parser, httptools.HttpResponseParser)
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            st.informational = True
            return
        if self._unanswered:
            entry = self._unanswered.popleft()
        else:  # capture began mid-stream: the request was not seen
            entry = _Entry(request=None, request_done=True)
            self._entries.append(entry)
        entry.response = Response(
            status=status,
            reason=st.first_line.decode("latin-1"),
            version=parser.get_http_version(),
            headers=st.headers,
            body=Body(),
            start_ns=st.start_ns,
            informational=self._informational,
        )
        self._informational = []
        self._cur_resp = entry
        method = entry.request.method if entry.request is not None else None
        tunnel = status == 101 or (method == "CONNECT" and 200 <= status < 300)
        if tunnel or method == "HEAD":
            self._finish_response(st)
            st.ignore = True  # llhttp may still complete "its" message; it is done already
            st.reset_pending = True
            if tunnel:
                st.stopped = "upgrade"
                self._streams["client"].stopped = "upgrade"
                self._streams["client"].held = None
        elif entry is self._upgrade_entry:
            self._resume_client = True  # the server refused the upgrade
        if entry is self._upgrade_entry:
            self._upgrade_entry = None

    def _on_body(self, side: Side, data: bytes) -> None:
        st = self._streams[side]
        if st.ignore:
            return
        entry = self._cur_req if side == "client" else self._cur_resp
        message = None
        if entry is not None:
            message = entry.request if side == "client" else entry.response
        if message is None:
            return
        body = message.body
        body.size += len(data)
        room = self.max_body - len(body.data)
        if room > 0 and not st.body_hole:
            body.data += data[:room]
        body.truncated = body.size > len(body.data)

    def _on_message_complete(self, side: Side) -> None:
        st = self._streams[side]
        if st.ignore:
            return
        if side == "client":
            entry = self._cur_req
            self._cur_req = None
            if entry is not None and entry.request is not None:
                entry.request.end_ns = self._now
                entry.request_done = True
                if entry.response_done:
                    self._emit(entry)
        elif st.informational:
            parser = st.parser
            assert isinstance(parser, httptools.HttpResponseParser)
            if len(self._informational) < _MAX_INFORMATIONAL:
                self._informational.append(parser.get_status_code())
        else:
            self._finish_response(st)
        if st.chunked:
            st.reset_pending = True  # httptools would leak the last trailer field
        st.new_message()

    def _finish_response(self, st: _Stream) -> None:
        entry = self._cur_resp
        self._cur_resp = None
        if entry is None or entry.response is None:
            return
        entry.response.end_ns = self._now
        entry.response_done = True
        if entry.request_done:
            self._emit(entry)

    def _emit(self, entry: _Entry) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
            self._out.append(entry.transaction())

    def _take(self) -> list[Transaction]:
        out, self._out = self._out, []
        return out
