"""Parse a TLS ClientHello from the first bytes a connection sent.

The kernel hands us at most the first 512 bytes of a single write, and a modern
ClientHello is often 517 bytes or more, so a cut-off hello is the normal case, not
an error: if the server_name extension is complete inside what we have, the SNI is
still returned (with ``truncated=True``). Anything else that does not parse raises
:class:`TlsParseError`, and nothing else is ever raised, whatever the input.

SNI policy: only a ``host_name`` (type 0) entry counts, and it must be printable
ASCII without spaces (0x21-0x7e). IDNs travel as A-labels ("xn--..."), so anything
else is a broken or hostile client and raises TlsParseError rather than passing
odd bytes on to logs. The name is returned exactly as sent (no case folding).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClientHello", "TlsParseError", "parse_client_hello"]

_CONTENT_HANDSHAKE = 0x16
_HANDSHAKE_CLIENT_HELLO = 1
# RFC 8446 5.1: a plaintext record (and handshake records are plaintext) carries at most 2^14.
_MAX_RECORD_LEN = 1 << 14
_RANDOM_LEN = 32
_MAX_SESSION_ID_LEN = 32

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_SNI_HOST_NAME = 0


class TlsParseError(ValueError):
    """The bytes are not a (usable prefix of a) TLS ClientHello."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What we keep from a ClientHello.

    When ``truncated`` is true the capture ended inside the extensions, after a complete
    server_name extension: ``alpn`` and ``supported_versions`` then hold only what was
    seen before the cut (they may be empty even though the client sent them).
    """

    sni: str | None
    alpn: tuple[str, ...]
    legacy_version: int
    supported_versions: tuple[int, ...]
    truncated: bool = False


class _Reader:
    """Bounds-checked cursor over one structure.

    ``declared`` is where the structure ends according to its length field; ``avail`` is
    where our bytes end (never past ``declared``). Overrunning ``declared`` means the
    input is malformed; overrunning only ``avail`` means the capture was cut off.
    """

    __slots__ = ("avail", "buf", "declared", "pos")

    def __init__(self, buf: bytes, pos: int, declared: int) -> None:
        self.buf = buf
        self.pos = pos
        self.declared = declared
        self.avail = min(declared, len(buf))

    def remaining(self) -> int:
        return self.avail - self.pos

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.declared:
            raise TlsParseError(f"malformed ClientHello: {what} overruns its enclosing length")
        if self.pos + n > self.avail:
            raise TlsParseError(f"truncated ClientHello: capture ends inside {what}")

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")


def parse_client_hello(data: bytes) -> ClientHello:
    """Parse a ClientHello (starting at the record header) from ``data``.

    Raises TlsParseError for anything that is not a ClientHello, is malformed, or was cut
    off before a complete server_name extension.
    """
    body = _handshake_stream(data)
    if len(body) < 4:
        raise TlsParseError("truncated ClientHello: capture ends inside the handshake header")
    if body[0] != _HANDSHAKE_CLIENT_HELLO:
        raise TlsParseError(f"not a ClientHello: handshake type {body[0]}")
    hs_len = int.from_bytes(body[1:4], "big")
    r = _Reader(body, 4, 4 + hs_len)

    legacy_version = r.uint(2, "legacy_version")
    if legacy_version >> 8 != 3:
        raise TlsParseError(f"malformed ClientHello: legacy_version {legacy_version:#06x}")
    r.take(_RANDOM_LEN, "random")
    session_id_len = r.uint(1, "session_id length")
    if session_id_len > _MAX_SESSION_ID_LEN:
        raise TlsParseError(f"malformed ClientHello: session_id length {session_id_len} > 32")
    r.take(session_id_len, "session_id")
    suites_len = r.uint(2, "cipher_suites length")
    if suites_len < 2 or suites_len % 2:
        raise TlsParseError(f"malformed ClientHello: cipher_suites length {suites_len}")
    r.take(suites_len, "cipher_suites")
    compression_len = r.uint(1, "compression_methods length")
    if compression_len < 1:
        raise TlsParseError("malformed ClientHello: no compression methods")
    r.take(compression_len, "compression_methods")

    if r.pos == r.declared:
        # Pre-TLS-1.2 clients may omit the extensions block entirely.
        return ClientHello(None, (), legacy_version, ())
    ext_len = r.uint(2, "extensions length")
    if r.pos + ext_len != r.declared:
        raise TlsParseError(
            "malformed ClientHello: extensions length disagrees with message length"
        )
    return _parse_extensions(_Reader(body, r.pos, r.declared), legacy_version)


def _handshake_stream(data: bytes) -> bytes:
    """Concatenate the payloads of the leading handshake records in ``data``.

    A ClientHello may be fragmented over several records; later records that are present
    in the same capture are joined on. Only the first record header is checked strictly:
    what follows may legitimately be other content (early data) and just ends the stream.
    """
    if len(data) < 5:
        raise TlsParseError("truncated: fewer than 5 bytes, no TLS record header")
    if data[0] != _CONTENT_HANDSHAKE:
        raise TlsParseError(f"not a TLS handshake record: content type {data[0]:#04x}")
    if data[1] != 3 or data[2] > 4:
        raise TlsParseError(f"not a TLS record: version {data[1]:#04x}{data[2]:02x}")
    rec_len = int.from_bytes(data[3:5], "big")
    if not 1 <= rec_len <= _MAX_RECORD_LEN:
        raise TlsParseError(f"malformed TLS record: length {rec_len}")
    parts = [data[5 : 5 + rec_len]]
    off = 5 + rec_len
    while off + 5 <= len(data) and data[off] == _CONTENT_HANDSHAKE:
        if data[off + 1] != 3 or data[off + 2] > 4:
            break
        rec_len = int.from_bytes(data[off + 3 : off + 5], "big")
        if not 1 <= rec_len <= _MAX_RECORD_LEN:
            break
        parts.append(data[off + 5 : off + 5 + rec_len])
        off += 5 + rec_len
    return b"".join(parts)


def _parse_extensions(r: _Reader, legacy_version: int) -> ClientHello:
    truncated = r.avail < r.declared
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    seen: set[int] = set()
    while r.pos < r.declared:
        if truncated and r.remaining() < 4:
            break
        ext_type = r.uint(2, "extension type")
        size = r.uint(2, f"extension {ext_type} length")
        if truncated and r.remaining() < size:
            # A length that overruns the declared end is still malformed, not just cut off.
            if r.pos + size > r.declared:
                r.take(size, f"extension {ext_type}")
            break
        ext = r.take(size, f"extension {ext_type}")
        if ext_type in seen:
            raise TlsParseError(f"malformed ClientHello: duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            sni = _parse_server_name(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
        elif ext_type == _EXT_SUPPORTED_VERSIONS:
            versions = _parse_supported_versions(ext)
    if truncated and _EXT_SERVER_NAME not in seen:
        raise TlsParseError("truncated ClientHello: capture ends before a server_name extension")
    return ClientHello(sni, alpn, legacy_version, versions, truncated)


def _parse_server_name(ext: bytes) -> str | None:
    r = _Reader(ext, 0, len(ext))
    list_len = r.uint(2, "server_name list length")
    if list_len == 0 or list_len != r.remaining():
        raise TlsParseError("malformed server_name: list length disagrees with extension length")
    host: str | None = None
    types: set[int] = set()
    while r.remaining():
        name_type = r.uint(1, "server_name type")
        # RFC 6066 only defines host_name; every entry in practice uses the same
        # length-prefixed shape, which lets us skip unknown types.
        name = r.take(r.uint(2, "server_name length"), "server_name")
        if name_type in types:
            raise TlsParseError(f"malformed server_name: two names of type {name_type}")
        types.add(name_type)
        if name_type == _SNI_HOST_NAME:
            host = _decode_host_name(name)
    return host


def _decode_host_name(name: bytes) -> str:
    if not name:
        raise TlsParseError("malformed server_name: empty host_name")
    if any(not 0x21 <= b <= 0x7E for b in name):
        raise TlsParseError("invalid server_name: host_name is not printable ASCII")
    return name.decode("ascii")


def _parse_alpn(ext: bytes) -> tuple[str, ...]:
    r = _Reader(ext, 0, len(ext))
    list_len = r.uint(2, "ALPN list length")
    if list_len == 0 or list_len != r.remaining():
        raise TlsParseError("malformed ALPN: list length disagrees with extension length")
    out: list[str] = []
    while r.remaining():
        size = r.uint(1, "ALPN protocol length")
        if size == 0:
            raise TlsParseError("malformed ALPN: empty protocol name")
        # Protocol ids are opaque bytes; keep non-ASCII ones visible but unambiguous.
        out.append(r.take(size, "ALPN protocol").decode("ascii", "backslashreplace"))
    return tuple(out)


def _parse_supported_versions(ext: bytes) -> tuple[int, ...]:
    r = _Reader(ext, 0, len(ext))
    list_len = r.uint(1, "supported_versions length")
    if list_len == 0 or list_len % 2 or list_len != r.remaining():
        raise TlsParseError("malformed supported_versions: bad list length")
    # GREASE values (RFC 8701) are kept as sent: they are part of the client's fingerprint.
    return tuple(r.uint(2, "supported version") for _ in range(list_len // 2))
