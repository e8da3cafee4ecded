"""HTTP/2 flood guard: per-connection frame-rate limits on what a client sends through the
proxy, and GOAWAY (ENHANCE_YOUR_CALM) then close for a client over one.

The proxy relays HTTP/2 byte for byte. Every frame a client sends costs the proxy (the
passive parser, the relay) and the upstream (a SETTINGS or PING to acknowledge, a stream to
start and tear down), so a client can take the CPU all other clients need with frames that
are individually valid. The limits follow what servers did after CVE-2019-9512 (PING),
-9513 (PRIORITY), -9515 (SETTINGS), -9518 (empty frames), CVE-2023-44487 (rapid reset) and
CVE-2024-27316 (CONTINUATION): a token bucket per frame class and connection, and a cap on
one header block. The guard reads only frame headers (9 bytes each) and copies nothing.

Over a limit, the offending frame and all after it are not relayed; the client is sent the
rest of the server frame it is in the middle of, then GOAWAY ENHANCE_YOUR_CALM (last stream:
the highest it opened), its sending half is closed and what it still sends is read and
dropped for a short while (so the GOAWAY is not lost to a reset), and the upstream is closed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field

from flowtap.protocols.http2 import PREFACE
from flowtap.proxy.channel import Channel, ChannelClosedError
from flowtap.proxy.events import ProxyStats
from flowtap.proxy.relay import Tap, pump, supervise

__all__ = ["FloodLimits", "H2Guard", "Rate", "relay_h2"]

log = logging.getLogger("flowtap.proxy")

_HEADER = 9
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
_PING, _CONTINUATION = 0x6, 0x9
_END_STREAM = 0x1
_END_HEADERS = 0x4
_ENHANCE_YOUR_CALM = 0xB
_GOAWAY = 0x7
# After the GOAWAY: how long the client's further bytes are read and dropped, and how long
# the upstream may take to complete the frame the client is in the middle of.
_LINGER = 1.0
_LINGER_BYTES = 1 << 20  # ...and at most this much of it (reading costs CPU too)


@dataclass(frozen=True)
class Rate:
    """A token bucket: ``per_second`` sustained, ``burst`` at once."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class FloodLimits:
    """What one client connection may send. Well-behaved clients send a handful of
    SETTINGS and PINGs, and cancel a few streams; the bursts leave them ample room."""

    settings: Rate = field(default_factory=lambda: Rate(10, 100))
    ping: Rate = field(default_factory=lambda: Rate(10, 100))
    reset: Rate = field(default_factory=lambda: Rate(100, 200))  # RST_STREAM frames
    empty: Rate = field(default_factory=lambda: Rate(10, 100))  # frames carrying nothing
    priority: Rate = field(default_factory=lambda: Rate(100, 1000))
    max_header_block: int = 256 << 10  # HEADERS + CONTINUATION bytes of one header block
    max_continuations: int = 64  # CONTINUATION frames in one header block


class _Bucket:
    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate.per_second
        self.burst = float(rate.burst)
        self.tokens = self.burst
        self.at = now

    def spend(self, now: float) -> bool:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class _Cursor:
    """Frame boundaries in one direction's byte stream, from the frame headers alone."""

    __slots__ = ("header", "remaining", "skip")

    def __init__(self, skip: int) -> None:
        self.skip = skip  # bytes to step over first (the client's preface)
        self.header = bytearray()  # a frame header cut across two chunks
        self.remaining = 0  # bytes of the current frame's payload still to come

    def at_boundary(self) -> bool:
        return not self.skip and not self.header and not self.remaining

    def next_header(self, data: bytes, pos: int) -> tuple[int, bytes | None]:
        """Steps over frame payload from ``pos``, then gathers the next frame header:
        (where it stopped, the whole header or None when ``data`` ended first). The
        caller sets ``remaining`` from a returned header."""
        end = len(data)
        while pos < end:
            if self.remaining:
                step = min(self.remaining, end - pos)
                self.remaining -= step
                pos += step
                continue
            step = min(_HEADER - len(self.header), end - pos)
            self.header += data[pos : pos + step]
            pos += step
            if len(self.header) == _HEADER:
                header = bytes(self.header)
                self.header.clear()
                return pos, header
        return pos, None


class H2Guard:
    """Frame-rate limits on one connection. ``client`` says how much of a chunk the client
    sent may be relayed; ``tripped`` says why the rest may not."""

    def __init__(self, limits: FloodLimits, now: float, *, sniff: bool = False) -> None:
        self.limits = limits
        # sniff: the connection is HTTP/2 only if the client's first bytes are the preface
        # (a server that spoke first left the proxy undecided); else the guard stands aside.
        self._sniffed = 0 if sniff else len(PREFACE)
        self.disabled = False
        self._buckets = {
            _SETTINGS: _Bucket(limits.settings, now),
            _PING: _Bucket(limits.ping, now),
            _RST_STREAM: _Bucket(limits.reset, now),
            _PRIORITY: _Bucket(limits.priority, now),
        }
        self._empty = _Bucket(limits.empty, now)
        self._client = _Cursor(len(PREFACE))
        self._server = _Cursor(0)
        self._block_bytes = 0  # of the header block in progress
        self._continuations = 0
        self.highest_stream = 0  # the highest stream the client opened (relayed)
        self.tripped: str | None = None

    @property
    def server_remaining(self) -> int:
        """Bytes the client needs before the next frame boundary of what it was sent."""
        cur = self._server
        if len(cur.header) >= 3:
            return _HEADER - len(cur.header) + _frame_length(cur.header)
        if cur.header:
            return 3 - len(cur.header)  # a lower bound: asked again once these came
        return cur.remaining

    def server(self, data: bytes) -> None:
        """Bytes relayed to the client: only their frame boundaries are followed."""
        if self.disabled:
            return
        cur = self._server
        pos = 0
        while True:
            pos, header = cur.next_header(data, pos)
            if header is None:
                return
            cur.remaining = _frame_length(header)

    def client(self, data: bytes, now: float) -> int:
        """How many bytes of ``data`` (what the client sent next) may be relayed: all of
        them, or those before the first frame over a limit (``tripped`` then says why)."""
        if self.tripped is not None:
            return 0
        if self._sniffed < len(PREFACE):
            have = min(len(data), len(PREFACE) - self._sniffed)
            if data[:have] != PREFACE[self._sniffed : self._sniffed + have]:
                self.disabled = True
            self._sniffed += have
        if self.disabled:
            return len(data)
        cur = self._client
        pos, end = 0, len(data)
        if cur.skip:
            step = min(cur.skip, end)
            cur.skip -= step
            pos = step
        while True:
            pos, header = cur.next_header(data, pos)
            if header is None:
                return end
            start = pos - _HEADER  # where this frame began (< 0: an earlier chunk)
            length = _frame_length(header)
            reason = self._check(header[3], header[4], length, header, now)
            if reason is not None:
                self.tripped = reason
                return max(0, start)
            cur.remaining = length

    def _check(self, kind: int, flags: int, length: int, header: bytes, now: float) -> str | None:
        bucket = self._buckets.get(kind)
        if bucket is not None and not bucket.spend(now):
            rate = {
                _SETTINGS: ("SETTINGS", self.limits.settings),
                _PING: ("PING", self.limits.ping),
                _RST_STREAM: ("RST_STREAM", self.limits.reset),
                _PRIORITY: ("PRIORITY", self.limits.priority),
            }[kind]
            return f"{rate[0]} frames over {rate[1].burst} at once or {rate[1].per_second:g}/s"
        empty = length == 0 and (
            (kind == _DATA and not flags & _END_STREAM)
            or (kind in (_HEADERS, _CONTINUATION) and not flags & _END_HEADERS)
        )
        if empty and not self._empty.spend(now):
            return (
                f"empty frames over {self.limits.empty.burst} at once "
                f"or {self.limits.empty.per_second:g}/s"
            )
        if kind == _HEADERS:
            self._block_bytes = length
            self._continuations = 0
        elif kind == _CONTINUATION:
            self._block_bytes += length
            self._continuations += 1
        if kind in (_HEADERS, _CONTINUATION) and (
            self._block_bytes > self.limits.max_header_block
            or self._continuations > self.limits.max_continuations
        ):
            return (
                f"header block over {self.limits.max_header_block} bytes or "
                f"{self.limits.max_continuations} CONTINUATION frames"
            )
        if kind == _HEADERS:  # relayed: the upstream may act on this stream
            stream_id = struct.unpack(">I", header[5:9])[0] & 0x7FFFFFFF
            self.highest_stream = max(self.highest_stream, stream_id)
        return None

    def goaway(self) -> bytes:
        payload = struct.pack(">II", self.highest_stream, _ENHANCE_YOUR_CALM)
        return _frame_header(len(payload), _GOAWAY, 0, 0) + payload


def _frame_length(header: bytes | bytearray) -> int:
    return int.from_bytes(header[0:3], "big")


def _frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return length.to_bytes(3, "big") + bytes((kind, flags)) + struct.pack(">I", stream_id)


async def relay_h2(
    client: Channel,
    upstream: Channel,
    tap_up: Tap,
    tap_down: Tap,
    *,
    idle_timeout: float,
    stats: ProxyStats,
    limits: FloodLimits | None = None,
    sniff: bool = False,
) -> tuple[bool, str | None]:
    """relay.relay for HTTP/2, with the flood guard on the client's frames (with ``sniff``,
    only if the client's first bytes are the HTTP/2 preface). Returns (False when closed for
    being idle, why the client was sent GOAWAY ENHANCE_YOUR_CALM or None)."""
    loop = asyncio.get_running_loop()
    guard = H2Guard(limits or FloodLimits(), loop.time(), sniff=sniff)
    activity = [loop.time()]

    async def up() -> None:
        while True:
            if not client.buf and not await client.fill() and not client.buf:
                upstream.write_eof()
                return
            data = client.take(len(client.buf))
            activity[0] = now = loop.time()
            n = guard.client(data, now)
            if n:
                piece = data if n == len(data) else data[:n]
                upstream.write(piece)
                tap_up(piece)
            if guard.tripped is not None:
                return
            await upstream.drain()

    def seen_down(data: bytes) -> None:
        guard.server(data)
        tap_down(data)

    tasks = {
        asyncio.ensure_future(up()),
        asyncio.ensure_future(pump(upstream, client, seen_down, activity)),
    }
    active = True
    try:
        active = await supervise(
            tasks, activity, idle_timeout, stop=lambda: guard.tripped is not None
        )
    finally:
        try:
            if guard.tripped is not None:
                stats.h2_flood_closed += 1
                # Counted (and in the close record): a log line each would be a flood too.
                log.debug("HTTP/2 client sent GOAWAY ENHANCE_YOUR_CALM: %s", guard.tripped)
                await _goaway(client, upstream, guard, tap_down)
        finally:
            client.close()
            upstream.close()
    if guard.tripped is not None:
        return True, f"HTTP/2 flood ({guard.tripped}): sent GOAWAY ENHANCE_YOUR_CALM"
    return active, None


async def _goaway(client: Channel, upstream: Channel, guard: H2Guard, tap_down: Tap) -> None:
    """Completes the server frame the client is in the middle of, sends the GOAWAY, closes
    the client's sending half, and drops what it still sends for a while."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LINGER
    try:
        async with asyncio.timeout_at(deadline):
            while guard.server_remaining and (upstream.buf or await upstream.fill()):
                piece = upstream.take(min(guard.server_remaining, len(upstream.buf)))
                client.write(piece)
                guard.server(piece)
                tap_down(piece)
    except (TimeoutError, ChannelClosedError, OSError):
        pass
    upstream.close()
    if guard.server_remaining:
        client.abort()  # no frame boundary to put the GOAWAY at
        return
    transport = client.transport
    try:
        client.write(guard.goaway())
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        # Read (and drop) what the client still sends: closing with unread bytes would
        # reset the connection, and the GOAWAY could be lost with it.
        async with asyncio.timeout_at(deadline + _LINGER):
            dropped = 0
            while dropped < _LINGER_BYTES:
                dropped += len(client.take(len(client.buf)))
                if not await client.fill():
                    break
    except (TimeoutError, ChannelClosedError, OSError):
        pass
