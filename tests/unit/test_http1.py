"""Passive HTTP/1.x parsing of both directions of a connection, from bytes alone."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtap.protocols.http1 import Http1Parser
from flowtap.protocols.messages import Body, Request, Response, Side, Transaction


def run(
    client: bytes | list[bytes],
    server: bytes | list[bytes],
    *,
    close: bool = True,
    parser: Http1Parser | None = None,
) -> tuple[list[Transaction], Http1Parser]:
    """Feed all the client chunks, then all the server chunks, then close."""
    p = parser if parser is not None else Http1Parser()
    out: list[Transaction] = []
    for i, chunk in enumerate([client] if isinstance(client, bytes) else client):
        out += p.feed("client", chunk, 100 + i)
    for i, chunk in enumerate([server] if isinstance(server, bytes) else server):
        out += p.feed("server", chunk, 200 + i)
    if close:
        out += p.close(300)
    return out, p


def only(txs: list[Transaction]) -> tuple[Request, Response]:
    assert len(txs) == 1, txs
    tx = txs[0]
    assert tx.error is None, tx
    assert tx.request is not None
    assert tx.response is not None
    return tx.request, tx.response


def targets(txs: list[Transaction]) -> list[str | None]:
    return [tx.request.target if tx.request else None for tx in txs]


def bodies(txs: list[Transaction]) -> list[bytes | None]:
    return [bytes(tx.response.body.data) if tx.response else None for tx in txs]


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: example.com\r\n" + extra + b"\r\n"


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


# -- one exchange, exactly ------------------------------------------------------------


def test_request_and_response_exact() -> None:
    client = (
        b"POST /api/v1/items?id=3&x=y HTTP/1.1\r\n"
        b"Host: api.example.com:8080\r\n"
        b"Accept: */*\r\n"
        b"X-Dup: one\r\n"
        b"Content-Type: application/json\r\n"
        b"x-dup: two\r\n"
        b"Content-Length: 11\r\n"
        b"\r\n"
        b'{"a": true}'
    )
    server = (
        b"HTTP/1.1 404 Not Found Here\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Content-Length: 5\r\n"
        b"Set-Cookie: b=2\r\n"
        b"\r\n"
        b"nope!"
    )
    p = Http1Parser()
    assert p.feed("client", client, 10) == []
    txs = p.feed("server", server, 20)
    req, resp = only(txs)
    assert req == Request(
        method="POST",
        target="/api/v1/items?id=3&x=y",
        version="1.1",
        headers=[
            ("Host", "api.example.com:8080"),
            ("Accept", "*/*"),
            ("X-Dup", "one"),
            ("Content-Type", "application/json"),
            ("x-dup", "two"),
            ("Content-Length", "11"),
        ],
        authority="api.example.com:8080",
        scheme=None,
        body=Body(bytearray(b'{"a": true}'), 11, False),
        start_ns=10,
        end_ns=10,
    )
    assert resp == Response(
        status=404,
        reason="Not Found Here",
        version="1.1",
        headers=[("Set-Cookie", "a=1"), ("Content-Length", "5"), ("Set-Cookie", "b=2")],
        body=Body(bytearray(b"nope!"), 5, False),
        start_ns=20,
        end_ns=20,
        informational=[],
    )
    assert txs[0].stream_id is None
    assert p.close(30) == []
    assert p.failed is None


def test_http10_and_timestamps_across_chunks() -> None:
    p = Http1Parser()
    assert p.feed("client", b"GET /old HTTP/1.0\r\n", 1) == []
    assert p.feed("client", b"\r\n", 2) == []
    assert p.feed("server", b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nab", 3) == []
    req, resp = only(p.feed("server", b"cd", 4))
    assert (req.version, req.authority, req.start_ns, req.end_ns) == ("1.0", None, 1, 2)
    assert (resp.version, resp.start_ns, resp.end_ns, bytes(resp.body.data)) == (
        "1.0",
        3,
        4,
        b"abcd",
    )


# -- connection reuse -----------------------------------------------------------------


def test_keep_alive_three_requests_in_order() -> None:
    p = Http1Parser()
    out: list[Transaction] = []
    for i, path in enumerate(["/1", "/2", "/3"]):
        assert p.feed("client", get(path), 10 * i) == []
        out += p.feed("server", ok(path.encode() * 2), 10 * i + 5)
        assert len(out) == i + 1
    assert targets(out) == ["/1", "/2", "/3"]
    assert bodies(out) == [b"/1/1", b"/2/2", b"/3/3"]
    assert all(tx.error is None for tx in out)
    assert p.close(100) == []


def test_pipelining_three_requests_before_any_response() -> None:
    p = Http1Parser()
    assert p.feed("client", get("/a") + get("/b") + get("/c"), 1) == []
    out = p.feed("server", ok(b"A") + ok(b"BB"), 2)
    assert targets(out) == ["/a", "/b"]
    out += p.feed("server", ok(b"CCC"), 3)
    assert targets(out) == ["/a", "/b", "/c"]
    assert bodies(out) == [b"A", b"BB", b"CCC"]
    assert p.close(4) == []


# -- bodies ---------------------------------------------------------------------------

CHUNKED_CLIENT = (
    b"PUT /upload HTTP/1.1\r\n"
    b"Host: h\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"5\r\nhello\r\n"
    b"1;ext=1\r\n \r\n"
    b"6\r\nworld\n\r\n"
    b"0\r\n"
    b"\r\n"
) + get("/next")
CHUNKED_SERVER = (
    b"HTTP/1.1 201 Created\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"a\r\n0123456789\r\n"
    b"3\r\nabc\r\n"
    b"0\r\n"
    b"X-Trailer: t\r\n"
    b"\r\n"
) + ok(b"after")


def test_chunked_request_and_response_bodies() -> None:
    out, p = run(CHUNKED_CLIENT, CHUNKED_SERVER)
    assert p.failed is None
    assert [tx.error for tx in out] == [None, None]
    assert out[0].request is not None and out[0].response is not None
    assert bytes(out[0].request.body.data) == b"hello world\n"
    assert out[0].request.body.size == 12
    assert out[0].response.status == 201
    assert bytes(out[0].response.body.data) == b"0123456789abc"
    # The trailer is not a header of this message, nor of the next one.
    assert out[0].response.headers == [("Transfer-Encoding", "chunked")]
    assert out[1].request is not None and out[1].response is not None
    assert out[1].request.headers == [("Host", "example.com")]
    assert out[1].response.headers == [("Content-Length", "5")]
    assert bytes(out[1].response.body.data) == b"after"


def _split_everywhere(side: Side) -> None:
    whole, _ = run(CHUNKED_CLIENT, CHUNKED_SERVER)
    data = CHUNKED_CLIENT if side == "client" else CHUNKED_SERVER
    for cut in range(len(data) + 1):
        parts = [data[:cut], data[cut:]]
        if side == "client":
            out, p = run(parts, CHUNKED_SERVER)
        else:
            out, p = run(CHUNKED_CLIENT, parts)
        assert p.failed is None, cut
        # Timestamps depend on which chunk a byte came in; everything else must not.
        for tx in out + whole:
            for msg in (tx.request, tx.response):
                assert msg is not None
                msg.start_ns = msg.end_ns = 0
        assert out == whole, cut


def test_chunked_split_at_every_byte_client() -> None:
    _split_everywhere("client")


def test_chunked_split_at_every_byte_server() -> None:
    _split_everywhere("server")


def test_body_over_max_body_is_truncated_with_exact_size() -> None:
    cap = 1 << 20
    body = bytes(range(256)) * (cap // 256) + b"!"
    assert len(body) == cap + 1
    client = b"POST /big HTTP/1.1\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    chunks = [client[i : i + 65536] for i in range(0, len(client), 65536)]
    out, p = run(chunks, ok(body), parser=Http1Parser(max_body=cap))
    req, resp = only(out)
    for b in (req.body, resp.body):
        assert b.size == cap + 1
        assert b.truncated is True
        assert len(b.data) == cap
        assert bytes(b.data) == body[:cap]
    assert p.failed is None


def test_body_exactly_max_body_is_not_truncated() -> None:
    out, _ = run(get("/"), ok(b"12345"), parser=Http1Parser(max_body=5))
    _, resp = only(out)
    assert (bytes(resp.body.data), resp.body.size, resp.body.truncated) == (b"12345", 5, False)


def test_gzip_body_kept_as_sent() -> None:
    packed = gzip.compress(b"hello hello hello")
    out, _ = run(get("/z"), ok(packed, b"Content-Encoding: gzip\r\n"))
    _, resp = only(out)
    assert ("Content-Encoding", "gzip") in resp.headers
    assert bytes(resp.body.data) == packed


# -- messages without a body ----------------------------------------------------------


def test_head_response_has_no_body_and_connection_continues() -> None:
    client = b"HEAD /file HTTP/1.1\r\nHost: h\r\n\r\n" + get("/after")
    server = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n" + ok(
        b"real body"
    )
    for server_chunks in ([server], [server[:40], server[40:]]):
        out, p = run(client, server_chunks)
        assert p.failed is None
        assert targets(out) == ["/file", "/after"]
        assert [tx.error for tx in out] == [None, None]
        head = out[0].response
        assert head is not None
        assert head.headers[0] == ("Content-Length", "1234")
        assert (bytes(head.body.data), head.body.size) == (b"", 0)
        assert bodies(out)[1] == b"real body"


def test_head_response_chunked_then_pipelined() -> None:
    client = b"HEAD /a HTTP/1.1\r\n\r\n" + b"HEAD /b HTTP/1.1\r\n\r\n" + get("/c")
    server = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        + ok(b"c")
    )
    out, p = run(client, server)
    assert p.failed is None
    assert targets(out) == ["/a", "/b", "/c"]
    assert bodies(out) == [b"", b"", b"c"]


@pytest.mark.parametrize(("status", "reason"), [(204, b"No Content"), (304, b"Not Modified")])
def test_204_and_304_have_no_body(status: int, reason: bytes) -> None:
    server = b'HTTP/1.1 %d %b\r\nETag: "x"\r\n\r\n' % (status, reason) + ok(b"next")
    out, p = run(get("/1") + get("/2"), server)
    assert p.failed is None
    assert [tx.response.status if tx.response else None for tx in out] == [status, 200]
    assert bodies(out) == [b"", b"next"]
    assert out[0].response is not None
    assert out[0].response.reason == reason.decode()


def test_100_continue_then_200() -> None:
    p = Http1Parser()
    head = b"POST /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    assert p.feed("client", head, 1) == []
    assert p.feed("server", b"HTTP/1.1 100 Continue\r\n\r\n", 2) == []
    assert p.feed("client", b"data", 3) == []
    req, resp = only(p.feed("server", ok(b"done"), 4))
    assert bytes(req.body.data) == b"data"
    assert (resp.status, resp.informational, bytes(resp.body.data)) == (200, [100], b"done")
    assert resp.start_ns == 4


def test_103_early_hints_recorded_not_paired() -> None:
    server = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"x")
    )
    out, _ = run(get("/"), server)
    _, resp = only(out)
    assert resp.informational == [103, 100]
    assert resp.headers == [("Content-Length", "1")]


def test_response_ended_by_close() -> None:
    p = Http1Parser()
    assert p.feed("client", get("/stream"), 1) == []
    assert p.feed("server", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ", 2) == []
    assert p.feed("server", b"part two", 3) == []
    req, resp = only(p.close(9))
    assert req.target == "/stream"
    assert bytes(resp.body.data) == b"part one, part two"
    assert resp.end_ns == 3
    assert p.close(10) == []


# -- incomplete connections -----------------------------------------------------------


def test_request_without_response_at_close() -> None:
    out, _ = run(get("/a") + get("/b"), ok(b"a"))
    assert targets(out) == ["/a", "/b"]
    assert [tx.error for tx in out] == [None, "no response"]
    assert out[1].response is None


def test_response_without_request_mid_stream() -> None:
    out, p = run(b"", ok(b"orphan") + ok(b"second"))
    assert p.failed is None
    assert [tx.request for tx in out] == [None, None]
    assert bodies(out) == [b"orphan", b"second"]
    assert [tx.error for tx in out] == [None, None]


def test_response_with_content_length_cut_by_close() -> None:
    out, _ = run(get("/"), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert len(out) == 1
    assert out[0].error == "incomplete response"
    assert bodies(out) == [b"abc"]


def test_gap_inside_a_known_length_body_is_skipped() -> None:
    """sendfile() bytes have no user buffer: a hole in a Content-Length body is stepped
    over, the body is flagged truncated, and parsing goes on."""
    p = Http1Parser()
    p.feed("client", get("/g") + get("/h"), 1)
    assert p.feed("server", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst", 2) == []
    assert p.gap("server", 50) == []
    out = p.feed("server", b"x" * 45 + ok(b"later"), 3)
    assert targets(out) == ["/g", "/h"]
    assert [tx.error for tx in out] == [None, None]
    first = out[0].response
    assert first is not None
    assert (bytes(first.body.data), first.body.size, first.body.truncated) == (b"first", 100, True)
    assert bodies(out)[1] == b"later"
    assert p.failed is None


def test_gap_inside_a_chunk_is_skipped() -> None:
    p = Http1Parser()
    p.feed("client", get("/c"), 1)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabcd"
    assert p.feed("server", head, 2) == []
    assert p.gap("server", 8) == []
    out = p.feed("server", b"mnop\r\n0\r\n\r\n", 3)
    assert targets(out) == ["/c"]
    response = out[0].response
    assert response is not None and out[0].error is None
    assert (bytes(response.body.data), response.body.size) == (b"abcd", 16)


def test_gap_mid_request_body_pairs_with_its_response() -> None:
    p = Http1Parser()
    assert p.feed("client", b"POST /p HTTP/1.1\r\nContent-Length: 10\r\n\r\nab", 1) == []
    assert p.gap("client", 4) == []
    assert p.feed("client", b"cdefGET /next HTTP/1.1\r\n\r\n", 2) == []
    out = p.feed("server", ok(b"r") + ok(b"s"), 3)
    assert targets(out) == ["/p", "/next"]
    assert bodies(out) == [b"r", b"s"]
    request = out[0].request
    assert request is not None and request.body.truncated and request.body.size == 10
    assert p.close(4) == []


def test_gap_in_a_header_section_resyncs_at_the_next_request() -> None:
    p = Http1Parser()
    assert p.feed("client", b"GET /lost HTTP/1.1\r\nHo", 1) == []
    assert p.gap("client", 30) == []
    # Bytes that do not start a message are passed over; a request line resumes.
    assert p.feed("client", b"st: x\r\n\r\n", 2) == []
    assert p.feed("client", get("/after"), 3) == []
    out = p.feed("server", ok(b"one") + ok(b"two"), 4)
    assert [tx.error for tx in out] == ["gap", None]
    assert targets(out) == [None, "/after"]  # the first lost its request head
    assert bodies(out) == [b"one", b"two"]
    assert p.failed is None


def test_response_lost_whole_resyncs_with_the_latest_request() -> None:
    p = Http1Parser()
    p.feed("client", get("/1"), 1)
    assert p.feed("server", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", 2) == []
    # More than the body left: the end of response 1 and the start of another are gone.
    out = p.gap("server", 500)
    assert targets(out) == ["/1"]
    assert out[0].error == "gap"
    p.feed("client", get("/2"), 3)
    p.feed("client", get("/3"), 4)
    out = p.feed("server", ok(b"three"), 5)
    assert [(tx.error, tx.request.target if tx.request else None) for tx in out] == [
        ("gap", "/2"),
        (None, "/3"),
    ]
    assert bodies(out)[1] == b"three"


# -- Upgrade and CONNECT --------------------------------------------------------------


def test_websocket_upgrade_stops_after_101() -> None:
    client = get("/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n") + b"\x81\x85frame"
    server = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"
    out, p = run(client, server)
    req, resp = only(out)
    assert (req.target, resp.status) == ("/ws", 101)
    assert p.failed is None
    assert p.feed("client", b"\x00\xff more frames", 400) == []
    assert p.feed("server", b"\x00\xff more frames", 400) == []


def test_connect_tunnel_stops_after_2xx() -> None:
    client = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n\x16\x03\x01"
    server = b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03binary"
    out, p = run(client, server)
    req, resp = only(out)
    assert (req.method, req.target) == ("CONNECT", "db.internal:5432")
    assert req.authority == "db.internal:5432"
    assert (resp.status, bytes(resp.body.data)) == (200, b"")
    assert p.failed is None


def test_refused_upgrade_keeps_parsing() -> None:
    client = get("/", b"Connection: Upgrade\r\nUpgrade: h2c\r\n") + get("/second")
    server = ok(b"plain") + ok(b"two")
    out, p = run(client, server)
    assert p.failed is None
    assert targets(out) == ["/", "/second"]
    assert bodies(out) == [b"plain", b"two"]
    assert [tx.error for tx in out] == [None, None]


# -- bad input and limits -------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "data"),
    [
        ("client", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        ("client", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
        ("server", b"SSH-2.0-OpenSSH_9.6\r\n"),
        ("server", b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n"),
        ("client", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ],
)
def test_garbage_sets_failed_without_raising(side: Side, data: bytes) -> None:
    p = Http1Parser()
    assert p.feed(side, data, 1) == []
    assert p.failed is not None
    assert p.failed.startswith("llhttp: ")
    assert p.feed(side, get("/"), 2) == []
    assert p.gap(side, 5) == []
    p.close(3)


def test_oversize_header_section_fails() -> None:
    p = Http1Parser(max_header_bytes=1024)
    head = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 2000
    assert p.feed("client", head, 1) == []
    assert p.failed is not None and "1024" in p.failed
    assert p.feed("client", b"\r\n\r\n", 2) == []


def test_oversize_header_section_across_many_feeds_fails() -> None:
    p = Http1Parser(max_header_bytes=1024)
    p.feed("server", b"HTTP/1.1 200 OK\r\n", 1)
    for i in range(200):
        p.feed("server", b"X-H: 0123456789\r\n", i)
    assert p.failed is not None and "header section" in p.failed


def test_too_many_headers_fails() -> None:
    p = Http1Parser(max_headers=10)
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(11)) + b"\r\n"
    assert p.feed("client", head, 1) == []
    assert p.failed == "more than 10 headers"


def test_exactly_max_headers_is_fine() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(10)) + b"\r\n"
    out, p = run(head, ok(b""), parser=Http1Parser(max_headers=10))
    req, _ = only(out)
    assert len(req.headers) == 10
    assert p.failed is None


def test_pending_requests_are_bounded() -> None:
    p = Http1Parser(max_pending=4)
    out = p.feed("client", b"".join(get(f"/{i}") for i in range(10)), 1)
    assert targets(out) == ["/0", "/1", "/2", "/3", "/4", "/5"]
    assert all(tx.error == "no response" for tx in out)
    assert targets(p.close(2)) == ["/6", "/7", "/8", "/9"]


# -- property: anything in, bounded state out -----------------------------------------

LIMIT_BODY = 64
LIMIT_HEADER_BYTES = 256
LIMIT_HEADERS = 8

_HTTPISH = st.sampled_from(
    [
        b"GET / HTTP/1.1\r\n",
        b"HEAD /h HTTP/1.1\r\n",
        b"CONNECT a:1 HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 100 Continue\r\n",
        b"HTTP/1.1 101 Switching\r\n",
        b"HTTP/1.1 204 No\r\n",
        b"Content-Length: 5\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: Upgrade\r\nUpgrade: x\r\n",
        b"\r\n",
        b"5\r\nhello\r\n",
        b"0\r\n\r\n",
        b"X: y\r\n",
    ]
)
_CHUNK = st.one_of(st.binary(max_size=80), _HTTPISH, st.lists(_HTTPISH, max_size=8).map(b"".join))
_SIDES: list[Side] = ["client", "server"]
# (lost?, side, bytes): feed the bytes or, one time in ten, report that many bytes lost.
_OPS = st.lists(
    st.tuples(st.integers(0, 9).map(lambda i: i == 0), st.sampled_from(_SIDES), _CHUNK),
    max_size=30,
)


def _check_bounded(txs: list[Transaction]) -> None:
    for tx in txs:
        for msg in (tx.request, tx.response):
            if msg is None:
                continue
            assert len(msg.body.data) <= LIMIT_BODY
            assert msg.body.truncated == (msg.body.size > len(msg.body.data))
            assert len(msg.headers) <= LIMIT_HEADERS
            assert sum(len(k) + len(v) for k, v in msg.headers) <= LIMIT_HEADER_BYTES


@settings(max_examples=200, deadline=None)
@given(ops=_OPS)
def test_arbitrary_input_never_raises_and_stays_bounded(
    ops: list[tuple[bool, Side, bytes]],
) -> None:
    p = Http1Parser(
        max_body=LIMIT_BODY,
        max_header_bytes=LIMIT_HEADER_BYTES,
        max_headers=LIMIT_HEADERS,
        max_pending=4,
    )
    out: list[Transaction] = []
    for t, (lost, side, data) in enumerate(ops):
        out += p.gap(side, len(data) + 1) if lost else p.feed(side, data, t)
        _check_bounded(out)
        # Internal state stays within the limits too.
        assert len(p._unanswered) <= 4
        assert len(p._entries) <= 4 + 2
        for s in p._streams.values():
            assert s.header_bytes <= LIMIT_HEADER_BYTES or p.failed is not None
            assert len(s.headers) <= LIMIT_HEADERS
            assert len(s.first_line) <= LIMIT_HEADER_BYTES
            assert s.held is None or len(s.held) <= LIMIT_HEADER_BYTES
    out += p.close(len(ops))
    _check_bounded(out)
    assert p.close(len(ops) + 1) == []


def test_a_body_that_ends_at_close_can_be_skipped_and_stays_exact() -> None:
    """No length, not chunked: the rest of the connection is that body. Past the cap it
    may all be skipped (and a gap in it is stepped over); its size stays exact."""
    p = Http1Parser(max_body=4)
    p.feed("client", get("/stream"), 1)
    assert p.skippable("server") == 0  # no response head yet
    assert p.feed("server", b"HTTP/1.0 200 OK\r\nContent-Type: x\r\n\r\nabcdef", 2) == []
    assert p.skippable("server") == 1 << 62
    assert p.gap("server", 1000) == []
    assert p.feed("server", b"tail", 3) == []
    (tx,) = p.close(4)
    assert tx.error is None and tx.response is not None
    assert (bytes(tx.response.body.data), tx.response.body.size) == (b"abcd", 1010)


def test_what_may_be_skipped_starts_past_the_cap() -> None:
    p = Http1Parser(max_body=4)
    head = b"POST /u HTTP/1.1\r\nContent-Length: 100\r\n\r\n"
    p.feed("client", head + b"ab", 1)
    assert p.skippable("client") == 0  # two of the four bytes kept so far
    p.feed("client", b"cdef", 2)
    assert p.skippable("client") == 94
    p.feed("client", b"x" * 94 + get("/next")[:5], 3)
    assert p.skippable("client") == 0  # a head in progress
