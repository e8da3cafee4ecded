"""A buffered byte channel over an asyncio transport, with backpressure both ways.

One object is the transport's protocol and the proxy's reader/writer: received bytes go into
one buffer the HTTP code consumes in place (no copy per read as with StreamReader), reading
pauses while that buffer is full, and ``drain`` waits while the transport's write buffer
is full. Timeouts are the caller's (``asyncio.timeout``), set only around real waits.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from typing import Any, cast

__all__ = [
    "Channel",
    "ChannelClosedError",
    "accept_channel",
    "describe_error",
    "open_channel",
]

_HIGH_WATER = 256 << 10  # pause reading past this many buffered bytes
_LOW_WATER = 64 << 10


class ChannelClosedError(ConnectionError):
    """The peer went away while we were writing to it."""


class Channel(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False  # the peer finished sending (or the connection is gone)
        self.lost = False
        self.transport: asyncio.Transport | None = None
        self._reader: asyncio.Future[None] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False

    # -- protocol callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake_reader()
        if len(self.buf) > _HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        # Keep our sending half open (TCP half-close); over TLS there is no half-close,
        # and asyncio warns on every connection if asked for one.
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = True
        self._wake_reader()
        waiter, self._drainer = self._drainer, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ChannelClosedError("connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drainer = self._drainer, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self._reader = self._reader, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading ----------------------------------------------------------------------

    async def fill(self) -> bool:
        """Wait for more bytes; False when the peer has finished sending."""
        if self.eof:
            return False
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        have = len(self.buf)
        while len(self.buf) == have and not self.eof:
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader
        return len(self.buf) > have

    def take(self, n: int) -> bytes:
        """Remove and return up to ``n`` buffered bytes."""
        if n >= len(self.buf):
            out = bytes(self.buf)
            self.buf.clear()
        else:
            out = bytes(self.buf[:n])
            del self.buf[:n]
        if self._read_paused and len(self.buf) < _LOW_WATER and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return out

    # -- writing ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.lost or self.transport is None:
            raise ChannelClosedError("connection lost")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.lost:
            raise ChannelClosedError("connection lost")
        if self._write_paused:
            self._drainer = asyncio.get_running_loop().create_future()
            await self._drainer

    def write_eof(self) -> None:
        """Half-close when the transport can (plain TCP), else close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def extra(self, name: str) -> Any:
        return self.transport.get_extra_info(name) if self.transport is not None else None

    def alpn(self) -> str | None:
        obj = self.extra("ssl_object")
        return obj.selected_alpn_protocol() if isinstance(obj, ssl.SSLObject) else None


async def accept_channel(
    sock: socket.socket, context: ssl.SSLContext | None = None, handshake_timeout: float = 10.0
) -> Channel:
    """A channel over an accepted socket; with ``context``, after the server-side handshake
    (its errors are raised)."""
    loop = asyncio.get_running_loop()
    channel = Channel()
    if context is None:
        await loop.connect_accepted_socket(lambda: channel, sock)
    else:
        await loop.connect_accepted_socket(
            lambda: channel, sock, ssl=context, ssl_handshake_timeout=handshake_timeout
        )
    return channel


async def open_channel(
    host: str,
    port: int,
    *,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 10.0,
    sock: socket.socket | None = None,
) -> Channel:
    """A channel to ``host:port`` (TLS with ``context``), connected within ``timeout``;
    over ``sock`` instead when given (already connected there)."""
    loop = asyncio.get_running_loop()
    channel = Channel()
    where: dict[str, Any] = {"sock": sock} if sock is not None else {"host": host, "port": port}
    async with asyncio.timeout(timeout):
        if context is None:
            await loop.create_connection(lambda: channel, **where)
        else:
            await loop.create_connection(
                lambda: channel,
                **where,
                ssl=context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
    transport = channel.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        # Small writes (a request head) must leave at once: the latency budget is < 1 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return channel


def describe_error(exc: BaseException) -> str:
    """A short reason for a failed connection: "connection refused (ECONNREFUSED)"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError):
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{(exc.strerror or str(exc)).lower()} ({name})"
    return str(exc) or type(exc).__name__
