"""Guess a connection's application protocol from its first bytes each way.

Each chunk is the start of a single read or write (at most 512 bytes), so every rule
looks only at a prefix and tolerates a short chunk. We do not know which side is the
client, so every rule is tried on both directions.
"""

from __future__ import annotations

from typing import Literal

from flowtap.protocols.tls_hello import TlsParseError, parse_client_hello

__all__ = ["L7Protocol", "describe_sni", "guess_l7"]

L7Protocol = Literal["http1", "http2", "tls", "dns", "other"]

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Shorter prefixes ("PRI * H") are too weak to tell apart from arbitrary text.
_H2_MIN_PREFIX = 8

_HTTP1_METHODS = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
)
_HTTP1_RESPONSE = b"HTTP/1."

_TLS_HANDSHAKE = 0x16
_TLS_MAX_RECORD_LEN = 1 << 14

_DNS_PORT = 53
_DNS_HEADER_LEN = 12
# Opcodes that carry exactly one question/zone entry: QUERY, NOTIFY, UPDATE.
_DNS_OPCODES = frozenset({0, 4, 5})
# IN, CH, HS, NONE, ANY.
_DNS_CLASSES = frozenset({1, 3, 4, 254, 255})
_DNS_MAX_LABEL = 63
_DNS_MAX_NAME = 255


def guess_l7(
    first_tx: bytes | None,
    first_rx: bytes | None,
    *,
    remote_port: int,
    local_port: int,
) -> L7Protocol | None:
    """Classify a connection; None when no bytes were seen in either direction.

    Rules, strongest evidence first: HTTP/2 preface, TLS record header, HTTP/1 request or
    status line, DNS-over-TCP framing (any port) or port 53, else "other".
    """
    chunks = [c for c in (first_tx, first_rx) if c]
    if not chunks:
        return None
    if any(_is_h2_preface(c) for c in chunks):
        return "http2"
    if any(_is_tls_record(c) for c in chunks):
        return "tls"
    if any(_is_http1(c) for c in chunks):
        return "http1"
    if any(_is_dns_over_tcp(c) for c in chunks) or _DNS_PORT in (remote_port, local_port):
        return "dns"
    return "other"


def describe_sni(first_tx: bytes | None, first_rx: bytes | None) -> str | None:
    """The SNI from whichever chunk is a ClientHello, else None; never raises."""
    for chunk in (first_tx, first_rx):
        if not chunk:
            continue
        try:
            hello = parse_client_hello(chunk)
        except TlsParseError:
            continue
        if hello.sni is not None:
            return hello.sni
    return None


def _is_h2_preface(chunk: bytes) -> bool:
    n = min(len(chunk), len(_H2_PREFACE))
    return n >= _H2_MIN_PREFIX and chunk[:n] == _H2_PREFACE[:n]


def _is_tls_record(chunk: bytes) -> bool:
    # Require the whole 5-byte header: the length field is what keeps this from matching
    # arbitrary binary that happens to start with 0x16 0x03.
    if len(chunk) < 5 or chunk[0] != _TLS_HANDSHAKE or chunk[1] != 3 or chunk[2] > 4:
        return False
    return 1 <= int.from_bytes(chunk[3:5], "big") <= _TLS_MAX_RECORD_LEN


def _is_http1(chunk: bytes) -> bool:
    return chunk.startswith(_HTTP1_METHODS) or chunk.startswith(_HTTP1_RESPONSE)


def _is_dns_over_tcp(chunk: bytes) -> bool:
    """A 2-byte length prefix, then a DNS header and one question that parses.

    Off port 53 a length prefix plus header is too weak on its own, so the question name
    must walk cleanly to its root label inside both the declared message and our bytes.
    """
    msg_len = int.from_bytes(chunk[:2], "big")
    msg = chunk[2 : 2 + msg_len]
    if len(msg) < _DNS_HEADER_LEN:
        return False
    flags = int.from_bytes(msg[2:4], "big")
    opcode = (flags >> 11) & 0xF
    z_bit = flags & 0x0040
    qdcount = int.from_bytes(msg[4:6], "big")
    if opcode not in _DNS_OPCODES or z_bit or qdcount != 1:
        return False
    pos = _DNS_HEADER_LEN
    while True:
        if pos >= len(msg):
            return False
        label = msg[pos]
        pos += 1
        if label == 0:
            break
        # The first name in a message cannot be a compression pointer (0xc0): nothing
        # precedes it to point at.
        if label > _DNS_MAX_LABEL or pos - _DNS_HEADER_LEN + label > _DNS_MAX_NAME:
            return False
        pos += label
    if pos + 4 > len(msg):
        return False
    return int.from_bytes(msg[pos + 2 : pos + 4], "big") in _DNS_CLASSES
