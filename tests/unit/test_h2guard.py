"""H2Guard on byte streams: frames followed across any cut, the first frame over a limit
is where relaying stops, buckets refill with time, non-HTTP/2 bytes are left alone."""

from __future__ import annotations

from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, PriorityFrame, SettingsFrame

from flowtap.protocols.http2 import PREFACE
from flowtap.proxy.h2guard import FloodLimits, H2Guard, Rate

PING = PingFrame(0, opaque_data=b"abcdefgh").serialize()
START = PREFACE + SettingsFrame(0).serialize()


def feed_in_pieces(guard: H2Guard, data: bytes, size: int, now: float = 0.0) -> int:
    """Feeds ``data`` ``size`` bytes at a time; returns how many bytes may be relayed."""
    relayed = 0
    for pos in range(0, len(data), size):
        piece = data[pos : pos + size]
        allowed = guard.client(piece, now)
        relayed += allowed
        if allowed < len(piece):
            break
    return relayed


def test_the_cut_is_at_the_first_frame_over_the_limit_whatever_the_pieces() -> None:
    """Nothing of a frame over the limit is relayed past its header's first piece."""
    limits = FloodLimits(ping=Rate(1, 5))
    data = START + PING * 20
    for size in (1, 7, 9, 17, 100, len(data)):
        guard = H2Guard(limits, 0.0)
        expected = len(START) + 5 * len(PING)
        # Bytes of the refused frame's header that came in earlier pieces were relayed
        # already (the upstream then sees a cut frame and the close): at most 8.
        assert expected <= feed_in_pieces(guard, data, size) <= expected + 8, size
        assert guard.tripped == "PING frames over 5 at once or 1/s"


def test_buckets_refill_with_time() -> None:
    guard = H2Guard(FloodLimits(ping=Rate(10, 5)), 0.0)
    assert guard.client(START + PING * 5, 0.0) == len(START) + 5 * len(PING)
    assert guard.client(PING * 2, 0.1) == len(PING)  # one token back after 0.1 s
    assert guard.tripped is not None
    assert guard.client(PING, 100.0) == 0  # once tripped, nothing more


def test_priority_empty_data_and_header_block_limits() -> None:
    priority = PriorityFrame(1, depends_on=0, stream_weight=16).serialize()
    guard = H2Guard(FloodLimits(priority=Rate(1, 3)), 0.0)
    assert guard.client(START + priority * 4, 0.0) == len(START) + 3 * len(priority)

    empty = DataFrame(1, b"").serialize()
    final = DataFrame(1, b"", flags=["END_STREAM"]).serialize()
    guard = H2Guard(FloodLimits(empty=Rate(1, 2)), 0.0)
    assert guard.client(START + final * 10, 0.0) == len(START) + 10 * len(final)
    assert guard.client(empty * 3, 0.0) == 2 * len(empty)

    open_block = HeadersFrame(3, b"\x82" * 100).serialize()  # no END_HEADERS
    guard = H2Guard(FloodLimits(max_header_block=150), 0.0)
    assert guard.client(START + open_block, 0.0) == len(START) + len(open_block)
    assert guard.highest_stream == 3
    more = HeadersFrame(5, b"\x82" * 200).serialize()
    assert guard.client(more, 0.0) == 0
    assert guard.highest_stream == 3  # the refused block's stream was not relayed
    assert guard.goaway() == bytes.fromhex("000008 07 00 00000000 00000003 0000000b")


def test_server_frames_followed_for_the_goaway() -> None:
    guard = H2Guard(FloodLimits(), 0.0)
    frame = DataFrame(1, b"x" * 100).serialize()
    guard.server(frame[:4])
    assert guard.server_remaining == 105  # 5 header bytes and 100 of payload to come
    guard.server(frame[4:50])
    assert guard.server_remaining == len(frame) - 50
    guard.server(frame[50:] + frame[:2])
    assert guard.server_remaining == 1  # not even the length known yet: one byte more
    guard.server(frame[2:])
    assert guard.server_remaining == 0


def test_sniffing_stands_aside_for_other_protocols() -> None:
    guard = H2Guard(FloodLimits(ping=Rate(1, 1)), 0.0, sniff=True)
    other = b"\x16\x03\x01" + PING * 10  # a TLS record, then bytes that look like PINGs
    assert guard.client(other, 0.0) == len(other)
    assert guard.disabled and guard.tripped is None
    guard = H2Guard(FloodLimits(ping=Rate(1, 1)), 0.0, sniff=True)
    assert guard.client(START[:5], 0.0) == 5
    assert guard.client(START[5:] + PING * 3, 0.0) == len(START) - 5 + len(PING)
    assert not guard.disabled and guard.tripped is not None
