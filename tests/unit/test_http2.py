"""Http2Parser on real byte streams: an h2 client and server talk, the parser listens."""

from __future__ import annotations

import struct

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtap.protocols.http2 import PREFACE, Http2Parser, error_code_name
from flowtap.protocols.messages import Side, Transaction

Headers = list[tuple[str, str]]


class Wire:
    """An h2 client and server connected back to back; records what each side sent."""

    def __init__(self) -> None:
        self.client = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        self.server = H2Connection(config=H2Configuration(client_side=False, header_encoding=None))
        self.chunks: list[tuple[Side, bytes]] = []
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.pump()

    def pump(self) -> None:
        """Deliver pending bytes both ways until both sides are quiet."""
        while True:
            moved = False
            out = self.client.data_to_send()
            if out:
                self.chunks.append(("client", out))
                self.server.receive_data(out)
                moved = True
            out = self.server.data_to_send()
            if out:
                self.chunks.append(("server", out))
                self.client.receive_data(out)
                moved = True
            if not moved:
                return

    def request(self, headers: Headers, body: bytes | None = None) -> int:
        stream_id: int = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            self.client.send_data(stream_id, body, end_stream=True)
        self.pump()
        return stream_id

    def respond(
        self,
        stream_id: int,
        headers: Headers,
        body: bytes = b"",
        trailers: Headers | None = None,
    ) -> None:
        self.server.send_headers(stream_id, headers, end_stream=not body and trailers is None)
        if body:
            self.server.send_data(stream_id, body, end_stream=trailers is None)
        if trailers is not None:
            self.server.send_headers(stream_id, trailers, end_stream=True)
        self.pump()

    def side(self, side: Side) -> bytes:
        return b"".join(data for who, data in self.chunks if who == side)


def replay(
    chunks: list[tuple[Side, bytes]], parser: Http2Parser | None = None
) -> list[Transaction]:
    parser = parser if parser is not None else Http2Parser()
    out: list[Transaction] = []
    for index, (side, data) in enumerate(chunks):
        out += parser.feed(side, data, 1000 * (index + 1))
    assert parser.failed is None
    return out


def get_headers(path: str = "/index.html?q=1") -> Headers:
    return [
        (":method", "GET"),
        (":path", path),
        (":authority", "example.com:8443"),
        (":scheme", "https"),
        ("user-agent", "flowtap-test/1.0"),
        ("accept", "*/*"),
    ]


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def test_get_with_response_body() -> None:
    wire = Wire()
    sid = wire.request(get_headers())
    wire.respond(sid, [(":status", "200"), ("content-type", "text/plain")], b"hello world")
    (txn,) = replay(wire.chunks)
    assert txn.stream_id == 1
    assert txn.error is None
    req = txn.request
    assert req is not None
    assert req.method == "GET"
    assert req.target == "/index.html?q=1"
    assert req.authority == "example.com:8443"
    assert req.scheme == "https"
    assert req.version == "2"
    assert req.headers == [("user-agent", "flowtap-test/1.0"), ("accept", "*/*")]
    assert req.body.size == 0
    assert not req.body.truncated
    resp = txn.response
    assert resp is not None
    assert resp.status == 200
    assert resp.reason == ""
    assert resp.version == "2"
    assert resp.headers == [("content-type", "text/plain")]
    assert bytes(resp.body.data) == b"hello world"
    assert resp.body.size == 11
    assert not resp.body.truncated
    assert resp.informational == []
    assert 0 < req.start_ns <= req.end_ns <= resp.start_ns <= resp.end_ns


def test_post_body_over_several_data_frames() -> None:
    wire = Wire()
    sid = wire.client.get_next_available_stream_id()
    headers = [(":method", "POST"), (":path", "/upload"), (":authority", "a"), (":scheme", "http")]
    wire.client.send_headers(sid, [*headers, ("content-type", "application/octet-stream")])
    parts = [b"first-", b"second-", b"third"]
    for index, part in enumerate(parts):
        wire.client.send_data(sid, part, end_stream=index == len(parts) - 1)
        wire.pump()
    wire.respond(sid, [(":status", "201")])
    (txn,) = replay(wire.chunks)
    assert txn.request is not None and txn.response is not None
    assert txn.request.method == "POST"
    assert txn.request.headers == [("content-type", "application/octet-stream")]
    assert bytes(txn.request.body.data) == b"first-second-third"
    assert txn.request.body.size == 18
    assert txn.response.status == 201
    assert txn.response.body.size == 0


def test_concurrent_streams_answered_out_of_order() -> None:
    wire = Wire()
    ids = {path: wire.request(get_headers(path)) for path in ("/a", "/b", "/c")}
    assert sorted(ids.values()) == [1, 3, 5]
    for path in ("/c", "/a", "/b"):
        wire.respond(ids[path], [(":status", "200")], f"body of {path}".encode())
    txns = replay(wire.chunks)
    assert [t.stream_id for t in txns] == [5, 1, 3]
    for txn in txns:
        assert txn.request is not None and txn.response is not None
        assert txn.stream_id == ids[txn.request.target]
        assert bytes(txn.response.body.data) == f"body of {txn.request.target}".encode()


def test_grpc_call_with_trailers() -> None:
    wire = Wire()
    request = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/helloworld.Greeter/SayHello"),
        (":authority", "localhost:50051"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    sid = wire.request(request, grpc_message(b"\x0a\x05world"))
    wire.respond(
        sid,
        [(":status", "200"), ("content-type", "application/grpc")],
        grpc_message(b"\x0a\x0bHello world"),
        trailers=[("grpc-status", "0"), ("grpc-message", "OK")],
    )
    (txn,) = replay(wire.chunks)
    assert txn.error is None
    assert txn.request is not None and txn.response is not None
    assert txn.request.target == "/helloworld.Greeter/SayHello"
    assert txn.request.headers == [("content-type", "application/grpc"), ("te", "trailers")]
    assert bytes(txn.request.body.data) == grpc_message(b"\x0a\x05world")
    assert txn.response.headers == [
        ("content-type", "application/grpc"),
        ("grpc-status", "0"),
        ("grpc-message", "OK"),
    ]
    assert bytes(txn.response.body.data) == grpc_message(b"\x0a\x0bHello world")


def test_body_larger_than_max_body_is_truncated() -> None:
    wire = Wire()
    sid = wire.request(get_headers())
    body = bytes(range(256)) * 40  # 10240 bytes, over several DATA frames is fine too
    wire.respond(sid, [(":status", "200")], body)
    (txn,) = replay(wire.chunks, Http2Parser(max_body=1000))
    assert txn.response is not None
    assert bytes(txn.response.body.data) == body[:1000]
    assert txn.response.body.size == len(body)
    assert txn.response.body.truncated


def test_rst_stream_cancel() -> None:
    wire = Wire()
    sid = wire.request(get_headers())
    wire.client.reset_stream(sid, error_code=ErrorCodes.CANCEL)
    wire.pump()
    parser = Http2Parser()
    # Streams reset before any response are summed up, returned when the connection ends.
    assert replay(wire.chunks, parser) == []
    (txn,) = parser.close(10**9)
    assert txn.error == "reset: CANCEL" and txn.count == 1
    assert txn.stream_id == sid
    assert txn.request is not None and txn.request.target == "/index.html?q=1"
    assert txn.response is None
    assert error_code_name(0x8) == "CANCEL"
    assert error_code_name(0x99) == "0x99"


def test_informational_status_recorded() -> None:
    wire = Wire()
    sid = wire.request(get_headers())
    wire.server.send_headers(sid, [(":status", "103"), ("link", "</s.css>; rel=preload")])
    wire.respond(sid, [(":status", "204")])
    (txn,) = replay(wire.chunks)
    assert txn.response is not None
    assert txn.response.status == 204
    assert txn.response.informational == [103]
    assert txn.response.headers == []


def _split_conversation() -> Wire:
    wire = Wire()
    sid = wire.request(get_headers())
    wire.respond(sid, [(":status", "200"), ("content-type", "text/html")], b"<html></html>")
    post = [(":method", "POST"), (":path", "/p"), (":authority", "x"), (":scheme", "https")]
    sid = wire.request(post, b"payload" * 5)
    wire.respond(sid, [(":status", "200")], b"ok", trailers=[("x-trailer", "t")])
    return wire


def test_split_at_every_byte_boundary_gives_identical_transactions() -> None:
    wire = _split_conversation()
    client, server = wire.side("client"), wire.side("server")
    parser = Http2Parser()
    expected = parser.feed("client", client, 1) + parser.feed("server", server, 1)
    assert len(expected) == 2
    assert all(t.error is None for t in expected)
    for cut in range(min(len(client), 400) + 1):
        parser = Http2Parser()
        got = parser.feed("client", client[:cut], 1)
        got += parser.feed("client", client[cut:], 1)
        got += parser.feed("server", server, 1)
        assert parser.failed is None, cut
        assert got == expected, cut
    for cut in range(min(len(server), 400) + 1):
        parser = Http2Parser()
        got = parser.feed("client", client, 1)
        got += parser.feed("server", server[:cut], 1)
        got += parser.feed("server", server[cut:], 1)
        assert parser.failed is None, cut
        assert got == expected, cut


def test_message_start_is_time_of_its_first_byte() -> None:
    wire = Wire()
    sid = wire.request(get_headers())
    wire.respond(sid, [(":status", "200")], b"x")
    client = wire.side("client")
    parser = Http2Parser()
    assert parser.feed("client", client[:-3], 10) == []
    assert parser.feed("client", client[-3:], 20) == []
    (txn,) = parser.feed("server", wire.side("server"), 30)
    assert txn.request is not None and txn.response is not None
    assert (txn.request.start_ns, txn.request.end_ns) == (10, 20)
    assert (txn.response.start_ns, txn.response.end_ns) == (30, 30)


def test_hpack_dynamic_table_reused_across_requests() -> None:
    wire = Wire()
    headers = [*get_headers("/one"), ("x-api-key", "0123456789abcdef0123456789abcdef")]
    before = len(wire.chunks)
    first = wire.request(headers)
    first_block = b"".join(d for s, d in wire.chunks[before:] if s == "client")
    wire.respond(first, [(":status", "200"), ("x-served-by", "backend-17.example")], b"1")
    before = len(wire.chunks)
    second = wire.request(headers)
    second_block = b"".join(d for s, d in wire.chunks[before:] if s == "client")
    wire.respond(second, [(":status", "200"), ("x-served-by", "backend-17.example")], b"2")
    # The second HEADERS frame refers to dynamic-table entries: much shorter.
    assert len(second_block) < len(first_block) - 30
    txns = replay(wire.chunks)
    assert [t.stream_id for t in txns] == [1, 3]
    for txn in txns:
        assert txn.request is not None and txn.response is not None
        assert txn.request.headers == headers[4:]
        assert txn.request.authority == "example.com:8443"
        assert txn.response.headers == [("x-served-by", "backend-17.example")]


def test_header_table_size_settings_followed() -> None:
    wire = Wire()
    # The client lets the server's encoder use a larger table, then forbids it any table.
    for size in (65536, 0, 8192):
        wire.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: size})
        wire.pump()
        sid = wire.request(get_headers(f"/size/{size}"))
        wire.respond(sid, [(":status", "200"), ("x-size", str(size))], b"b")
    txns = replay(wire.chunks)
    assert len(txns) == 3
    for txn, size in zip(txns, (65536, 0, 8192), strict=True):
        assert txn.request is not None and txn.response is not None
        assert txn.request.target == f"/size/{size}"
        assert txn.response.headers == [("x-size", str(size))]


def _server_headers(encoder: Encoder, stream_id: int) -> bytes:
    block = encoder.encode([(b":status", b"200")])
    return HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"]).serialize()


def test_header_table_size_decrease_enforced_after_ack() -> None:
    client_settings = SettingsFrame(0, {SettingsFrame.HEADER_TABLE_SIZE: 0}).serialize()
    request = Encoder().encode(
        [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"h")]
    )
    client = PREFACE + client_settings
    client += HeadersFrame(1, request, flags=["END_HEADERS", "END_STREAM"]).serialize()
    client += HeadersFrame(3, request, flags=["END_HEADERS", "END_STREAM"]).serialize()
    server = SettingsFrame(0).serialize()
    encoder = Encoder()  # never told of the client's limit: no table size update
    # Before its ACK, the server may still use the old table size.
    parser = Http2Parser()
    parser.feed("client", client, 1)
    (txn,) = parser.feed("server", server + _server_headers(encoder, 1), 2)
    assert txn.response is not None and txn.response.status == 200
    # After the ACK, a block without the required size update is an HPACK error.
    ack = SettingsFrame(0, flags=["ACK"]).serialize()
    out = parser.feed("server", ack + _server_headers(encoder, 3), 3)
    assert parser.failed is not None and parser.failed.startswith("hpack")
    assert [t.stream_id for t in out] == [3]
    assert out[0].error == parser.failed


def test_push_promise_ignored_but_hpack_kept() -> None:
    wire = Wire()
    sid = wire.request(get_headers("/page"))
    pushed_request = [
        (":method", "GET"),
        (":path", "/style.css"),
        (":authority", "example.com:8443"),
        (":scheme", "https"),
        ("x-pushed-header", "indexed-into-the-table"),
    ]
    wire.server.push_stream(sid, 2, pushed_request)
    wire.server.send_headers(2, [(":status", "200"), ("x-pushed-header", "indexed-into-the-table")])
    wire.server.send_data(2, b"body{}", end_stream=True)
    wire.respond(sid, [(":status", "200"), ("x-pushed-header", "indexed-into-the-table")], b"p")
    (txn,) = replay(wire.chunks)
    assert txn.stream_id == sid
    assert txn.response is not None
    assert txn.response.headers == [("x-pushed-header", "indexed-into-the-table")]
    assert bytes(txn.response.body.data) == b"p"


def test_goaway_noted() -> None:
    wire = Wire()
    sid = wire.request(get_headers())
    wire.respond(sid, [(":status", "200")])
    wire.server.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=sid)
    wire.pump()
    parser = Http2Parser()
    assert len(replay(wire.chunks, parser)) == 1
    assert parser.goaway is not None
    assert parser.goaway.side == "server"
    assert parser.goaway.last_stream_id == sid
    assert parser.goaway.error == "NO_ERROR"


def test_close_returns_open_streams() -> None:
    wire = Wire()
    wire.request(get_headers("/slow"))
    parser = Http2Parser()
    assert replay(wire.chunks, parser) == []
    assert parser.open_streams == 1
    (txn,) = parser.close(99)
    assert txn.error == "connection closed"
    assert txn.request is not None and txn.request.target == "/slow"
    assert txn.response is None
    assert parser.close(100) == []


def test_garbage_after_preface_fails() -> None:
    parser = Http2Parser()
    assert parser.feed("client", PREFACE + b"\xde\xad\xbe\xef" * 20, 1) == []
    assert parser.failed is not None
    assert parser.feed("client", b"more", 2) == []
    assert parser.feed("server", b"\x00" * 100, 3) == []
    assert parser.close(4) == []


def test_garbage_frame_after_settings_fails() -> None:
    wire = Wire()
    wire.request(get_headers())
    parser = Http2Parser()
    parser.feed("client", wire.side("client"), 1)
    out = parser.feed("client", b"\xff" * 64, 2)  # length 0xffffff: over SETTINGS_MAX_FRAME_SIZE
    assert parser.failed is not None and parser.failed.startswith("frame too large")
    assert [t.error for t in out] == [parser.failed]


def test_missing_preface_fails() -> None:
    parser = Http2Parser()
    assert parser.feed("client", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1) == []
    assert parser.failed == "bad preface"


def test_no_preface_expected_mid_connection() -> None:
    wire = Wire()
    sid = wire.request(get_headers())
    wire.respond(sid, [(":status", "200")], b"ok")
    parser = Http2Parser(expect_preface=False)
    txns = parser.feed("client", wire.side("client")[len(PREFACE) :], 1)
    txns += parser.feed("server", wire.side("server"), 2)
    assert parser.failed is None
    assert len(txns) == 1 and txns[0].error is None


def test_gap_gives_up_open_streams() -> None:
    wire = Wire()
    sid = wire.client.get_next_available_stream_id()
    wire.client.send_headers(sid, get_headers())  # request body still to come
    wire.pump()
    parser = Http2Parser()
    assert replay(wire.chunks, parser) == []
    (txn,) = parser.gap("client", 1500)
    assert txn.error == "gap"
    assert txn.stream_id == sid
    assert parser.failed == "gap"
    assert parser.feed("client", b"\x00" * 50, 5) == []
    assert parser.gap("server", 10) == []
    assert parser.close(6) == []


def test_limits_fail_the_connection() -> None:
    wire = Wire()
    for index in range(3):
        wire.request(get_headers(f"/{index}"))
    parser = Http2Parser(max_streams=2)
    out: list[Transaction] = []
    for side, data in wire.chunks:
        out += parser.feed(side, data, 1)
    assert parser.failed == "too many streams"
    assert sorted(t.stream_id or 0 for t in out) == [1, 3]

    wire = Wire()
    wire.request([*get_headers(), ("x-big", "v" * 5000)])
    parser = Http2Parser(max_header_list=1024)
    for side, data in wire.chunks:
        parser.feed(side, data, 1)
    assert parser.failed == "header block too large"


def test_data_frame_on_unknown_stream_ignored() -> None:
    parser = Http2Parser(expect_preface=False)
    assert parser.feed("client", DataFrame(7, b"x", flags=["END_STREAM"]).serialize(), 1) == []
    assert parser.failed is None


def _frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    header = struct.pack(">I", len(payload))[1:] + bytes([frame_type, flags])
    return header + struct.pack(">I", stream_id) + payload


# Raw bytes, or well-framed frames of any type with arbitrary payloads (to get past framing).
_frames = st.builds(
    _frame,
    st.integers(0, 10),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
    st.binary(max_size=64),
)
_chunks = st.lists(
    st.tuples(st.sampled_from(["client", "server"]), st.binary(max_size=200) | _frames),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(chunks=_chunks, prefix=st.booleans(), expect_preface=st.booleans())
def test_arbitrary_bytes_never_raise(
    chunks: list[tuple[str, bytes]], prefix: bool, expect_preface: bool
) -> None:
    parser = Http2Parser(
        max_body=64, max_header_list=512, max_streams=4, expect_preface=expect_preface
    )
    if prefix:
        parser.feed("client", PREFACE + SettingsFrame(0).serialize(), 0)
        parser.feed("server", SettingsFrame(0).serialize(), 0)
    for ts, (side, data) in enumerate(chunks):
        for txn in parser.feed("client" if side == "client" else "server", data, ts):
            assert isinstance(txn, Transaction)
    parser.gap("server", 1)
    assert parser.close(len(chunks)) == []


def test_response_seen_before_its_request_is_paired() -> None:
    """Each direction comes from its own calls: a response can be seen before the bytes
    of its request (a writer delayed between its syscall and its return probe)."""
    wire = Wire()
    first = wire.request(get_headers("/one"))
    wire.respond(first, [(":status", "200")], b"1")
    second = wire.request(get_headers("/two"))
    wire.respond(second, [(":status", "204")])
    chunks = list(wire.chunks)
    # Move the second request's bytes after the response to it.
    request_two = next(i for i, c in enumerate(chunks) if c[0] == "client" and i > 3)
    moved = chunks.pop(request_two)
    chunks.append(moved)

    out = replay(chunks)
    assert [(t.request.target if t.request else None, t.error) for t in out] == [
        ("/one", None),
        ("/two", None),
    ]
    assert [t.response.status if t.response else None for t in out] == [200, 204]


def test_response_whose_request_never_comes_is_released_at_close() -> None:
    """Capture that began mid-connection: held responses come out at close, as before."""
    wire = Wire()
    first = wire.request(get_headers("/lost"))
    wire.respond(first, [(":status", "200")], b"body")
    parser = Http2Parser()
    server = b"".join(d for s, d in wire.chunks if s == "server")

    assert parser.feed("server", server, 1) == []  # held, waiting for its request
    (txn,) = parser.close(2)
    assert (txn.request, txn.error, txn.stream_id) == (None, None, 1)
    assert txn.response is not None and bytes(txn.response.body.data) == b"body"
