"""What a client's first bytes are, decided by the grammars (sans-IO), and how the proxy
waits for enough of them without consuming any (MSG_PEEK and SO_RCVLOWAT).

The decision never depends on timing: bytes that may still become an HTTP/1 request line
or a ClientHello are waited for, however slowly they come (within bounds the caller sets),
so a client cannot get its bytes relayed uninspected by pausing.

* ``tls``: a whole ClientHello, possibly fragmented over several handshake records
  (bounded at ``MAX_CLIENT_HELLO`` bytes);
* ``http2``: the HTTP/2 connection preface;
* ``http1``: leading empty lines (RFC 9112 §2.2 says to ignore them), then a token (any
  method, extension methods included), whitespace, and a line that names an ``HTTP/``
  version, or a method registered for HTTP. It goes to the strict request parser, which
  forwards it or refuses it; a request line that never ends is HTTP too (refused 431);
* ``other``: anything else (binary protocols, Redis or memcached text commands).
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Literal

__all__ = ["MAX_CLIENT_HELLO", "Kind", "classify", "peek_until", "wait_readable"]

Kind = Literal["tls", "http1", "http2", "other"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A ClientHello is one handshake message up to 2^24 bytes; real ones are under 16 KiB and
# servers refuse larger ones (OpenSSL: 128 KiB). Past this bound we decide on what we have.
MAX_CLIENT_HELLO = 64 << 10
_MAX_HELLO_RECORDS = 32  # real clients fragment a ClientHello over a few records at most
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_EMPTY_LINES = re.compile(rb"[\r\n]*")
_MAX_EMPTY_LINES = 1024  # bytes of empty lines before a request line: past this, HTTP/1
_MAX_METHOD = 64  # a token longer than any method is decided as HTTP/1 (the parser judges)
_VERSION = re.compile(rb"HTTP/", re.IGNORECASE)
# Registered methods (IANA HTTP Method Registry): a request line with one of these is HTTP
# even without a version (HTTP/0.9 shape), and is refused by the strict parser.
_METHODS = frozenset(
    b"ACL BASELINE-CONTROL BIND CHECKIN CHECKOUT CONNECT COPY DELETE GET HEAD LABEL LINK LOCK "
    b"MERGE MKACTIVITY MKCALENDAR MKCOL MKREDIRECTREF MKWORKSPACE MOVE OPTIONS ORDERPATCH "
    b"PATCH POST PRI PROPFIND PROPPATCH PURGE PUT QUERY REBIND REPORT SEARCH TRACE UNBIND "
    b"UNCHECKOUT UNLINK UNLOCK UPDATE UPDATEREDIRECTREF VERSION-CONTROL".split()
)


def classify(data: bytes, max_line: int) -> Kind | None:
    """The protocol of a client's first bytes, or None while more are needed to decide.
    ``max_line``: a request line longer than this is decided as HTTP/1 (and refused)."""
    if not data:
        return None
    if data[0] == 0x16:
        return _classify_tls(data)
    if H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return "http2" if len(data) >= len(H2_PREFACE) else None
    return _classify_http1(data, max_line)


def _classify_tls(data: bytes) -> Kind | None:
    """``tls`` once the handshake records hold a whole handshake message (or a bound is
    reached); ``other`` when the record layer is not TLS."""
    if len(data) >= 2 and data[1] != 3:
        return "other"
    off = 0
    stream = 0  # handshake bytes in the records seen so far
    header = bytearray()  # the handshake message's 4-byte header, maybe over records
    for _ in range(_MAX_HELLO_RECORDS):
        if len(data) - off < 5:
            break
        if data[off] != 0x16 or data[off + 1] != 3:
            return "tls" if off else "other"  # another content type ends the hello
        length = int.from_bytes(data[off + 3 : off + 5], "big")
        if not 1 <= length <= 1 << 14:
            return "tls" if off else "other"
        payload = data[off + 5 : off + 5 + length]
        if len(header) < 4:
            header += payload[: 4 - len(header)]
        stream += len(payload)
        off += 5 + length
        if len(header) == 4 and stream >= 4 + int.from_bytes(header[1:4], "big"):
            return "tls"
        if off >= len(data):
            break
    else:
        return "tls"  # fragmented past any real client: decide on what there is
    return "tls" if len(data) >= MAX_CLIENT_HELLO else None


def _classify_http1(data: bytes, max_line: int) -> Kind | None:
    pos = _EMPTY_LINES.match(data).end()  # type: ignore[union-attr]
    if pos >= len(data):
        return "http1" if pos > _MAX_EMPTY_LINES else None  # only empty lines so far
    if pos > _MAX_EMPTY_LINES:
        return "http1"
    end = _TOKEN.match(data, pos).end()  # type: ignore[union-attr]
    if end == pos:
        return "other"  # not a token: not a request line
    if end == len(data):
        return "http1" if end - pos > _MAX_METHOD else None  # the method may go on
    if data[end] not in b" \t":
        return "other"  # "PING\r\n", binary after letters...
    line_end = data.find(b"\n", end)
    if line_end < 0:
        # No line end yet: wait, unless the line is past any sane request line.
        return "http1" if len(data) > max_line else None
    line = data[end:line_end]
    if _VERSION.search(line) is not None or data[pos:end] in _METHODS:
        return "http1"
    return "other"


async def wait_readable(sock: socket.socket, deadline: float | None) -> None:
    """Returns once ``sock`` is readable (its SO_RCVLOWAT decides how many bytes that
    takes; EOF and errors count too); TimeoutError at ``deadline`` (loop time)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout_at(deadline):
            await ready
    finally:
        loop.remove_reader(fd)


async def peek_until(sock: socket.socket, have: int, most: int, deadline: float | None) -> bytes:
    """The bytes waiting in ``sock`` (left there) once there are more than ``have`` of
    them, or at EOF; at most ``most``. TimeoutError at ``deadline``.

    Readiness is level-triggered: with bytes already waiting the socket stays readable,
    so the kernel is told to wake us only for more (SO_RCVLOWAT) instead of polling."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, min(have + 1, most)))
        while True:
            try:
                data = sock.recv(most, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            if data is not None and (len(data) > have or not data or len(data) >= most):
                return data
            await wait_readable(sock, deadline)
            if data is not None and sock.recv(most, socket.MSG_PEEK) == data:
                # Readable without new bytes: EOF after the bytes we have (a FIN adds
                # none), or the kernel's receive memory is under pressure (many tiny
                # segments), which also makes it readable early: tell them apart.
                if _peer_finished(sock):
                    return data
                async with asyncio.timeout_at(deadline):
                    await asyncio.sleep(0.002)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _peer_finished(sock: socket.socket) -> bool:
    """Whether the peer sent its FIN (tcpi_state, the first byte of TCP_INFO)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return True
    return info[0] != 1  # not ESTABLISHED: CLOSE_WAIT, or closed altogether
