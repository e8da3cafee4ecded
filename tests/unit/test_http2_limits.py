"""Http2Parser under hostile peers: HPACK table and header bombs stay within the caps (and
are counted), floods of reset streams become one summary transaction."""

from __future__ import annotations

import tracemalloc

from hpack import Encoder
from hyperframe.frame import HeadersFrame, RstStreamFrame, SettingsFrame

from flowtap.protocols.http2 import PREFACE, HeaderBudget, Http2Parser
from flowtap.protocols.messages import Transaction

HUGE_TABLE = 2**32 - 1
REQUEST = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a.test")]
STATUS = [(":status", "204")]


def settings(table_size: int | None = None, *, ack: bool = False) -> bytes:
    frame = SettingsFrame(0, flags=["ACK"] if ack else [])
    if table_size is not None:
        frame.settings[SettingsFrame.HEADER_TABLE_SIZE] = table_size
    return frame.serialize()


def headers(stream_id: int, block: bytes, *, end_stream: bool = True) -> bytes:
    flags = ["END_HEADERS", *(["END_STREAM"] if end_stream else [])]
    return HeadersFrame(stream_id, block, flags=flags).serialize()


def handshake(parser: Http2Parser, server_table: int | None) -> None:
    """Preface, both SETTINGS (the server's advertising ``server_table``) and both ACKs."""
    assert parser.feed("client", PREFACE + settings(), 1) == []
    assert parser.feed("server", settings(server_table) + settings(ack=True), 2) == []
    assert parser.feed("client", settings(ack=True), 3) == []


def test_table_bomb_past_the_cap_stops_the_connection_counted() -> None:
    """The server allows a 4 GiB table; a client encoder that fills it with 4,000 new
    4 KB entries is stopped once the table holds more than the 64 KiB cap."""
    budget = HeaderBudget(1 << 30)
    parser = Http2Parser(budget=budget)
    handshake(parser, HUGE_TABLE)
    encoder = Encoder()
    encoder.header_table_size = HUGE_TABLE  # the next block starts with the size update
    tracemalloc.start()
    try:
        blocks = 0
        for index in range(4000):
            block = encoder.encode([*REQUEST, (f"x-{index}", "y" * 4000)])
            parser.feed("client", headers(2 * index + 1, block), 4 + index)
            if parser.failed:
                break
            blocks += 1
            parser.feed("server", headers(2 * index + 1, Encoder().encode(STATUS)), 4 + index)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parser.header_limit
    assert parser.failed == "dynamic table over the 65536-byte cap"
    assert blocks == 65536 // (4000 + 5 + 32)  # entries of name x-N, a 4000-byte value
    assert peak < 4 << 20, peak
    assert parser.header_memory == 0 and budget.used == 0
    # Nothing more is parsed, nothing raised.
    assert parser.feed("client", headers(9001, encoder.encode(REQUEST)), 5) == []
    assert parser.close(6) == []


def test_a_huge_table_allowed_but_not_filled_is_followed() -> None:
    """python-h2 clients announce the 4 GiB table a server offers at once and never fill
    it: that is no bomb, the connection is followed."""
    parser = Http2Parser()
    handshake(parser, HUGE_TABLE)
    encoder = Encoder()
    encoder.header_table_size = HUGE_TABLE
    out = parser.feed("client", headers(1, encoder.encode(REQUEST)), 4)
    out += parser.feed("server", headers(1, Encoder().encode(STATUS)), 5)
    assert parser.failed is None and len(out) == 1


def test_header_bomb_is_memory_bounded() -> None:
    """4,000 header blocks of 15 references to a 4 KiB table entry (60 KiB decoded from
    about 20 bytes each), on streams never answered: the connection's cap stops it at
    2 MiB of held headers; without it, 1,000 streams would hold 60 MiB."""
    budget = HeaderBudget(1 << 30)
    parser = Http2Parser(budget=budget)
    handshake(parser, 1 << 16)
    encoder = Encoder()
    big = ("x-bomb", "b" * 4000)
    wire = [headers(1, encoder.encode([*REQUEST, big]), end_stream=False)]
    wire += [
        headers(2 * i + 1, encoder.encode([*REQUEST, *[big] * 15]), end_stream=False)
        for i in range(1, 4000)
    ]
    assert sum(map(len, wire)) < 200_000  # a small input
    tracemalloc.start()
    try:
        held = 0
        for index, frame in enumerate(wire):
            parser.feed("client", frame, 10 + index)
            held = max(held, parser.header_memory)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parser.header_limit
    assert parser.failed == "headers held by open streams over 2097152 bytes"
    table = 4000 + 6 + 32  # the one x-bomb entry in the dynamic table, charged too
    assert (2 << 20) + table >= held > (2 << 20) + table - 70_000
    assert peak < 16 << 20, peak
    assert parser.header_memory == 0 and budget.used == 0


def test_process_budget_shared_by_connections() -> None:
    budget = HeaderBudget(200_000)
    first, second = Http2Parser(budget=budget), Http2Parser(budget=budget)
    encoder1, encoder2 = Encoder(), Encoder()
    handshake(first, None)
    handshake(second, None)
    block = [*REQUEST, ("x-pad", "p" * 3000)]
    for sid in range(1, 100, 2):  # 50 open streams of ~3 KiB: 150 KB of the budget
        first.feed("client", headers(sid, encoder1.encode(block), end_stream=False), 10)
    assert first.failed is None and 150_000 < budget.used <= 200_000
    for sid in range(1, 100, 2):
        second.feed("client", headers(sid, encoder2.encode(block), end_stream=False), 10)
    assert second.header_limit
    assert second.failed == "process header budget exhausted (200000 bytes)"
    assert first.failed is None
    assert len(first.close(20)) == 50
    assert budget.used == 0


def test_table_within_the_cap_is_followed() -> None:
    """A 64 KiB table (the cap) is used in full without a limit."""
    budget = HeaderBudget(1 << 30)
    parser = Http2Parser(budget=budget)
    handshake(parser, 1 << 16)
    encoder = Encoder()
    encoder.header_table_size = 1 << 16
    out: list[Transaction] = []
    for index in range(40):  # 40 distinct 2 KB entries: more than 4 KiB, within 64 KiB
        block = encoder.encode([*REQUEST, (f"x-{index}", "v" * 2000)])
        out += parser.feed("client", headers(2 * index + 1, block), 10 + index)
        out += parser.feed(
            "server", headers(2 * index + 1, Encoder().encode([(":status", "204")])), 10
        )
    assert parser.failed is None and len(out) == 40
    assert out[-1].request is not None and out[-1].request.headers == [("x-39", "v" * 2000)]
    assert budget.used == parser.header_memory  # what the table holds
    assert 65536 - 2036 < budget.used <= 65536
    parser.close(100)
    assert budget.used == 0


def rapid_reset(count: int) -> list[bytes]:
    encoder = Encoder()
    wire = []
    for index in range(count):
        sid = 2 * index + 1
        wire.append(headers(sid, encoder.encode(REQUEST), end_stream=True))
        wire.append(RstStreamFrame(sid, error_code=0x8).serialize())
    return wire


def test_rapid_reset_becomes_one_summary() -> None:
    parser = Http2Parser()
    handshake(parser, None)
    out: list[Transaction] = []
    for frame in rapid_reset(5000):
        out += parser.feed("client", frame, 100)
    assert out == [] and parser.failed is None and parser.open_streams == 0
    (summary,) = parser.close(200)
    assert (summary.count, summary.stream_id, summary.error) == (5000, 1, "reset: CANCEL")
    assert summary.request is not None and summary.request.target == "/"
    assert summary.response is None


def test_reset_summary_flushed_after_its_window_and_mixed_codes() -> None:
    parser = Http2Parser(reset_window_ns=1000)
    handshake(parser, None)
    out: list[Transaction] = []
    for frame in rapid_reset(10):
        out += parser.feed("client", frame, 100)
    out += parser.feed("server", RstStreamFrame(21, error_code=0x7).serialize(), 1099)
    assert out == []
    encoder = Encoder()
    out += parser.feed("client", headers(23, encoder.encode(REQUEST)), 1100)  # window over
    (summary,) = out
    assert (summary.count, summary.error) == (10, "reset: CANCEL")
    parser.feed("client", RstStreamFrame(23, error_code=0x8).serialize(), 1200)
    parser.feed("client", headers(25, encoder.encode(REQUEST)), 1300)
    parser.feed("server", RstStreamFrame(25, error_code=0x7).serialize(), 1400)
    (second,) = parser.close(1500)
    assert (second.count, second.stream_id, second.error) == (2, 23, "reset: mixed error codes")


def test_reset_after_the_response_began_keeps_its_record() -> None:
    parser = Http2Parser()
    handshake(parser, None)
    parser.feed("client", headers(1, Encoder().encode(REQUEST)), 10)
    status = Encoder().encode([(":status", "200")])
    assert parser.feed("server", headers(1, status, end_stream=False), 11) == []
    (tx,) = parser.feed("client", RstStreamFrame(1, error_code=0x8).serialize(), 12)
    assert (tx.count, tx.error) == (1, "reset: CANCEL")
    assert tx.response is not None and tx.response.status == 200


def test_huge_headers_frame_refused_before_it_is_buffered() -> None:
    """A server allowing 16 MiB frames: a HEADERS frame announcing 16 MiB is refused from
    its 9-byte header, not after 16 MiB were buffered."""
    parser = Http2Parser()
    assert parser.feed("client", PREFACE + settings(), 1) == []
    big_frames = SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: (1 << 24) - 1})
    parser.feed("server", big_frames.serialize() + settings(ack=True), 2)
    length = (1 << 24) - 1
    header = length.to_bytes(3, "big") + bytes((0x1, 0x4)) + (1).to_bytes(4, "big")
    assert parser.feed("client", header + b"\0" * 1000, 3) == []
    assert parser.header_limit and parser.failed == "header block too large"
