"""PayloadTracker: data events put back in order per direction, gaps, parser choice."""

from __future__ import annotations

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hpack import Encoder
from hyperframe.frame import HeadersFrame, RstStreamFrame, SettingsFrame

from flowtap.events import Conn, Data, Endpoint, Flow
from flowtap.protocols.http2 import PREFACE
from flowtap.records.connection import Record, WallClock
from flowtap.records.http import HttpRecordOptions
from flowtap.tracking.payloads import PayloadTracker

REQUEST = b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
PROCESS = {"pid": 4242, "comm": "curl"}


def conn(direction: str = "egress") -> Conn:
    return Conn(
        conn_id=1,
        start_ns=0,
        family="ipv4",
        protocol="tcp",
        direction="egress" if direction == "egress" else "ingress",
        local=Endpoint("127.0.0.1", 40000),
        remote=Endpoint("127.0.0.1", 80),
    )


def tracker(
    records: list[Record], *, direction: str = "egress", known: bool = True
) -> PayloadTracker:
    def lookup(conn_id: int) -> tuple[Record, Conn] | None:
        return ({"process": PROCESS}, conn(direction)) if known and conn_id == 1 else None

    return PayloadTracker(
        records.append, lookup, HttpRecordOptions(level="full"), clock=WallClock()
    )


def data(flow: Flow, position: int, payload: bytes) -> Data:
    return Data(timestamp_ns=1_000, conn_id=1, flow=flow, position=position, data=payload)


def test_egress_request_then_response() -> None:
    records: list[Record] = []
    payloads = tracker(records)

    payloads.on_data(data("tx", 0, REQUEST))
    payloads.on_data(data("rx", 0, RESPONSE))

    (record,) = records
    assert record["request"]["path"] == "/a"
    assert record["response"]["status"] == 200
    assert (record["bytes_sent"], record["bytes_received"]) == (0, 5)
    assert payloads.stats.transactions == 1


def test_ingress_swaps_the_sides() -> None:
    records: list[Record] = []
    payloads = tracker(records, direction="ingress")

    payloads.on_data(data("rx", 0, REQUEST))  # the client's request arrives
    payloads.on_data(data("tx", 0, RESPONSE))

    (record,) = records
    assert record["direction"] == "ingress"
    assert (record["bytes_sent"], record["bytes_received"]) == (5, 0)


@pytest.mark.parametrize("cut", [1, 10, len(REQUEST) - 1])
def test_pieces_in_order_and_repeated_bytes(cut: int) -> None:
    records: list[Record] = []
    payloads = tracker(records)

    payloads.on_data(data("tx", 0, REQUEST[:cut]))
    payloads.on_data(data("tx", 0, REQUEST[:cut]))  # seen already: ignored
    payloads.on_data(data("tx", cut - 1, REQUEST[cut - 1 :]))  # overlaps by one byte
    payloads.on_data(data("rx", 0, RESPONSE))

    (record,) = records
    assert record["request"]["path"] == "/a"
    assert payloads.stats.gaps == 0
    assert payloads.stats.bytes == len(REQUEST) + len(RESPONSE)


def test_a_gap_is_counted_and_given_to_the_parser() -> None:
    records: list[Record] = []
    payloads = tracker(records)

    payloads.on_data(data("tx", 0, REQUEST))
    payloads.on_data(data("rx", 0, RESPONSE[:20]))
    payloads.on_data(data("rx", 30, RESPONSE[30:]))  # 10 bytes lost in the kernel

    assert (payloads.stats.gaps, payloads.stats.gap_bytes) == (1, 10)
    (record,) = records
    assert record["error"] == "gap"


def h2_exchange() -> tuple[bytes, bytes, bytes]:
    """(server's SETTINGS, client's preface and request, server's response) of one GET."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    settings = server.data_to_send()
    client.initiate_connection()
    headers = [(":method", "GET"), (":path", "/h2"), (":authority", "x"), (":scheme", "http")]
    client.send_headers(1, headers, end_stream=True)
    to_server = client.data_to_send()
    server.receive_data(to_server)
    server.send_headers(1, [(":status", "204")], end_stream=True)
    return settings, to_server, server.data_to_send()


def test_http2_chosen_by_the_client_preface() -> None:
    settings, to_server, to_client = h2_exchange()
    records: list[Record] = []
    payloads = tracker(records)

    payloads.on_data(data("tx", 0, to_server))
    payloads.on_data(data("rx", 0, settings + to_client))

    (record,) = records
    assert (record["request"]["protocol"], record["request"]["path"]) == ("HTTP/2", "/h2")
    assert (record["response"]["status"], record["stream_id"]) == (204, 1)


def test_http2_chosen_by_the_server_settings_seen_first() -> None:
    """An HTTP/2 server writes its SETTINGS before it reads the client's preface."""
    settings, to_server, to_client = h2_exchange()
    records: list[Record] = []
    payloads = tracker(records, direction="ingress")

    payloads.on_data(data("tx", 0, settings))
    payloads.on_data(data("rx", 0, to_server))
    payloads.on_data(data("tx", len(settings), to_client))

    (record,) = records
    assert (record["request"]["protocol"], record["response"]["status"]) == ("HTTP/2", 204)
    assert payloads.stats.parser_errors == 0


def test_socket_and_tls_plaintext_are_separate_streams() -> None:
    """The same connection's ciphertext positions never mix with its plaintext ones."""
    records: list[Record] = []
    payloads = tracker(records)

    payloads.on_data(data("tx", 0, REQUEST))
    payloads.on_data(Data(2_000, 1, "tx", 0, REQUEST, "openssl"))
    payloads.on_data(Data(3_000, 1, "rx", 0, RESPONSE, "openssl"))

    (record,) = records
    assert record["capture_source"] == "openssl"
    assert record["request"]["scheme"] == "https"
    assert payloads.stats.gaps == 0


def test_close_flushes_a_request_without_response() -> None:
    records: list[Record] = []
    payloads = tracker(records)

    payloads.on_data(data("tx", 0, REQUEST))
    payloads.on_close(1, 5_000)

    (record,) = records
    assert (record["response"], record["error"]) == (None, "no response")


def test_unknown_connection_is_counted() -> None:
    records: list[Record] = []
    payloads = tracker(records, known=False)

    payloads.on_data(data("tx", 0, REQUEST))

    assert records == []
    assert payloads.stats.unknown_connection == 1


def test_junk_stops_the_parser_once() -> None:
    records: list[Record] = []
    payloads = tracker(records)

    payloads.on_data(data("tx", 0, b"GET \x00\x01\x02 junk\r\n\r\n"))
    payloads.on_data(data("tx", 21, b"more junk"))

    assert payloads.stats.parser_errors == 1
    assert records == []


UPLOAD_HEAD = b"POST /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 300000\r\n\r\n"


def skipping_tracker(
    records: list[Record], asked: list[tuple[int, int, int]], max_body: int = 1024
) -> PayloadTracker:
    def lookup(conn_id: int) -> tuple[Record, Conn] | None:
        return ({"process": PROCESS}, conn()) if conn_id == 1 else None

    options = HttpRecordOptions(level="full", max_body_bytes=max_body)
    return PayloadTracker(
        records.append,
        lookup,
        options,
        clock=WallClock(),
        skip=lambda *args: asked.append(args),
    )


def test_a_body_past_the_cap_is_skipped_by_the_kernel_and_counted() -> None:
    """Once 1 KiB of a 300,000-byte body is kept, the kernel is asked once not to copy
    the rest; its length-only events keep body_size exact and the request complete."""
    records: list[Record] = []
    asked: list[tuple[int, int, int]] = []
    payloads = skipping_tracker(records, asked)
    head = len(UPLOAD_HEAD)

    payloads.on_data(data("tx", 0, UPLOAD_HEAD + b"a" * 4000))
    payloads.on_data(data("tx", head + 4000, b"b" * 4000))  # copied before the ask arrived
    payloads.on_data(Data(2_000, 1, "tx", head + 8000, b"", skipped=292_000))
    payloads.on_data(data("rx", 0, RESPONSE))
    payloads.on_close(1, 9_000, sent=head + 300_000, received=len(RESPONSE))

    assert asked == [(1, head + 300_000, 0), (1, 0, 0)]  # the ask, then its removal
    (record,) = records
    assert record["error"] is None
    assert record["request"]["body_size"] == 300_000
    assert record["truncated"]["request_body"] is True
    assert (payloads.stats.gaps, payloads.stats.skipped_bytes) == (0, 292_000)


def test_short_bodies_are_not_worth_a_word_to_the_kernel() -> None:
    records: list[Record] = []
    asked: list[tuple[int, int, int]] = []
    payloads = skipping_tracker(records, asked)
    body = b"x" * 5000
    head = b"POST /s HTTP/1.1\r\nHost: e\r\nContent-Length: 5000\r\n\r\n"

    payloads.on_data(data("tx", 0, head + body))
    payloads.on_data(data("rx", 0, RESPONSE))
    payloads.on_close(1, 9_000, sent=len(head) + 5000, received=len(RESPONSE))

    assert asked == []
    assert records[0]["request"]["body_size"] == 5000


def test_bytes_lost_at_the_end_are_a_gap_the_close_reveals() -> None:
    """No later event shows a gap at the very end of a stream: the close's byte count
    does, so the body's size stays exact and the request complete (the gap counted)."""
    records: list[Record] = []
    payloads = skipping_tracker(records, [])
    head = len(UPLOAD_HEAD)

    payloads.on_data(data("tx", 0, UPLOAD_HEAD + b"a" * 4000))
    payloads.on_data(data("rx", 0, RESPONSE))
    payloads.on_close(1, 9_000, sent=head + 300_000, received=len(RESPONSE))

    (record,) = records
    assert record["error"] is None
    assert record["request"]["body_size"] == 300_000
    assert (payloads.stats.gaps, payloads.stats.gap_bytes) == (1, 296_000)


def _h2_client_bytes(blocks: list[bytes]) -> bytes:
    return PREFACE + SettingsFrame(0).serialize() + b"".join(blocks)


def test_sensor_sums_up_a_rapid_reset_and_counts_a_header_bomb() -> None:
    """The sensor's path (PayloadTracker): 300 streams opened and reset make one record
    with ``streams`` 300; a table bomb on the same kind of connection is counted as
    http2_header_limit (and as a parser error)."""
    request = [(":method", "GET"), (":path", "/x"), (":scheme", "https"), (":authority", "a")]
    records: list[Record] = []
    payloads = tracker(records)
    encoder = Encoder()
    frames: list[bytes] = []
    for index in range(300):
        block = encoder.encode(request)
        frames.append(HeadersFrame(2 * index + 1, block, flags=["END_HEADERS"]).serialize())
        frames.append(RstStreamFrame(2 * index + 1, error_code=0x8).serialize())
    client = _h2_client_bytes(frames)
    payloads.on_data(data("rx", 0, SettingsFrame(0).serialize()))
    payloads.on_data(data("tx", 0, client))
    assert records == []
    payloads.on_close(1, 2_000)
    (record,) = records
    assert (record["streams"], record["stream_id"], record["error"]) == (300, 1, "reset: CANCEL")
    assert record["request"]["path"] == "/x"
    assert payloads.stats.http2_header_limit == 0

    records.clear()
    bomb = tracker(records)
    table = SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 2**32 - 1})
    bomb.on_data(data("rx", 0, table.serialize()))
    encoder = Encoder()
    encoder.header_table_size = 2**32 - 1
    blocks = [
        HeadersFrame(
            2 * i + 1, encoder.encode([*request, (f"x-{i}", "v" * 4000)]), flags=["END_HEADERS"]
        ).serialize()
        for i in range(100)
    ]
    bomb.on_data(data("tx", 0, _h2_client_bytes(blocks)))
    assert (bomb.stats.http2_header_limit, bomb.stats.parser_errors) == (1, 1)
    assert {r["error"] for r in records} == {"dynamic table over the 65536-byte cap"}
