"""TLS ClientHello parsing and L7 guessing, from bytes alone."""

from __future__ import annotations

import random
import ssl
import struct

import pytest

from flowtap.protocols.sniff import describe_sni, guess_l7
from flowtap.protocols.tls_hello import ClientHello, TlsParseError, parse_client_hello

HOST = "api.example.com"
CAPTURE = 512
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def openssl_hello(
    server_hostname: str | None = HOST,
    *,
    alpn: list[str] | None = None,
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> bytes:
    """The first flight of a real client (this Python's OpenSSL), without any network."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = max_version
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def sni_ext(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(struct.pack("!BH", t, len(n)) + n for t, n in entries)
    return struct.pack("!H", len(names)) + names


def hand_hello(
    extensions: list[tuple[int, bytes]] | None,
    *,
    legacy_version: int = 0x0303,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01",
    compression: bytes = b"\x00",
    trailing: bytes = b"",
) -> bytes:
    """A ClientHello assembled field by field, so malformed variants are easy to make."""
    body = struct.pack("!H", legacy_version) + bytes(32)
    body += struct.pack("!B", len(session_id)) + session_id
    body += struct.pack("!H", len(suites)) + suites
    body += struct.pack("!B", len(compression)) + compression
    if extensions is not None:
        exts = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in extensions)
        body += struct.pack("!H", len(exts)) + exts
    body += trailing
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def sni_extension_end(hello: bytes, host: str) -> int:
    """Offset just past the encoded server_name extension, found without the parser."""
    name = host.encode()
    ext = struct.pack("!HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    start = hello.index(ext)
    return start + len(ext)


@pytest.fixture(scope="module")
def hello() -> bytes:
    return openssl_hello()


# --- parse_client_hello: real hellos -------------------------------------------------------


def test_real_hello(hello: bytes) -> None:
    assert len(hello) > CAPTURE  # OpenSSL pads to 512 handshake bytes: 517 on the wire
    assert parse_client_hello(hello) == ClientHello(
        sni=HOST,
        alpn=(),
        legacy_version=0x0303,
        supported_versions=(0x0304, 0x0303),
        truncated=False,
    )


def test_real_hello_with_alpn() -> None:
    parsed = parse_client_hello(openssl_hello(alpn=["h2", "http/1.1"]))
    assert parsed.sni == HOST
    assert parsed.alpn == ("h2", "http/1.1")
    assert parsed.truncated is False


def test_real_hello_without_sni() -> None:
    parsed = parse_client_hello(openssl_hello(None))
    assert parsed == ClientHello(None, (), 0x0303, (0x0304, 0x0303), False)


def test_real_tls12_only_hello_has_no_supported_versions() -> None:
    parsed = parse_client_hello(openssl_hello(max_version=ssl.TLSVersion.TLSv1_2))
    assert parsed == ClientHello(HOST, (), 0x0303, (), False)


def test_trailing_bytes_after_the_record_are_ignored(hello: bytes) -> None:
    assert parse_client_hello(hello + b"\x17\x03\x03\x00\x05hello").sni == HOST


# --- parse_client_hello: truncation --------------------------------------------------------


def test_truncated_to_capture_still_has_sni(hello: bytes) -> None:
    parsed = parse_client_hello(hello[:CAPTURE])
    assert parsed.sni == HOST
    assert parsed.legacy_version == 0x0303
    assert parsed.truncated is True


def test_alpn_before_the_cut_is_kept() -> None:
    hello = openssl_hello(alpn=["h2", "http/1.1"])
    parsed = parse_client_hello(hello[:CAPTURE])
    assert (parsed.sni, parsed.alpn, parsed.truncated) == (HOST, ("h2", "http/1.1"), True)


def test_every_cut_before_sni_end_raises(hello: bytes) -> None:
    end = sni_extension_end(hello, HOST)
    assert 0 < end < CAPTURE
    for cut in range(end):
        with pytest.raises(TlsParseError):
            parse_client_hello(hello[:cut])


def test_every_cut_after_sni_end_finds_sni(hello: bytes) -> None:
    for cut in range(sni_extension_end(hello, HOST), len(hello)):
        parsed = parse_client_hello(hello[:cut])
        assert (parsed.sni, parsed.truncated) == (HOST, True)


def test_truncated_hello_without_sni_raises() -> None:
    hello = openssl_hello(None)
    with pytest.raises(TlsParseError, match="before a server_name extension"):
        parse_client_hello(hello[:CAPTURE])


def test_hello_fragmented_over_two_records_is_reassembled(hello: bytes) -> None:
    hs = hello[5:]
    first, second = hs[:60], hs[60:]
    data = b"\x16\x03\x01" + struct.pack("!H", len(first)) + first
    data += b"\x16\x03\x01" + struct.pack("!H", len(second)) + second
    assert parse_client_hello(data) == parse_client_hello(hello)


def test_hello_fragmented_with_second_record_missing_raises(hello: bytes) -> None:
    first = hello[5:65]
    with pytest.raises(TlsParseError, match="truncated"):
        parse_client_hello(b"\x16\x03\x01" + struct.pack("!H", len(first)) + first)


# --- parse_client_hello: hand-built hellos -------------------------------------------------


def test_hand_hello_without_extensions_block() -> None:
    assert parse_client_hello(hand_hello(None, legacy_version=0x0301)) == ClientHello(
        None, (), 0x0301, (), False
    )


def test_hand_hello_with_every_field() -> None:
    data = hand_hello(
        [
            (0x0A0A, b""),  # GREASE extension: skipped
            (0, sni_ext((0, b"Mixed.Example.ORG"))),
            (16, b"\x00\x0c\x02h2\x08http/1.1"),
            (43, b"\x06\x3a\x3a\x03\x04\x03\x03"),
        ],
        session_id=bytes(range(32)),
        suites=b"\x13\x01\x13\x02\xc0\x2f",
        compression=b"\x01\x00",
    )
    assert parse_client_hello(data) == ClientHello(
        "Mixed.Example.ORG", ("h2", "http/1.1"), 0x0303, (0x3A3A, 0x0304, 0x0303), False
    )


def test_only_host_name_type_counts() -> None:
    assert parse_client_hello(hand_hello([(0, sni_ext((1, b"x")))])).sni is None
    data = hand_hello([(0, sni_ext((1, b"other"), (0, b"a.example")))])
    assert parse_client_hello(data).sni == "a.example"


def test_non_ascii_alpn_is_escaped() -> None:
    assert parse_client_hello(hand_hello([(16, b"\x00\x02\x01\xff")])).alpn == ("\\xff",)


BAD_RECORDS: list[tuple[bytes, str]] = [
    (b"", "fewer than 5 bytes"),
    (b"\x16\x03\x01\x00", "fewer than 5 bytes"),
    (b"\x17\x03\x03\x00\x10" + bytes(16), "content type 0x17"),
    (b"\x16\x02\x00\x00\x10" + bytes(16), "version 0x0200"),
    (b"\x16\x03\x05\x00\x10" + bytes(16), "version 0x0305"),
    (b"\x16\x03\x01\x00\x00", "length 0"),
    (b"\x16\x03\x01\x40\x01" + bytes(100), "length 16385"),
    (b"\x16\x03\x03\x00\x04\x02\x00\x00\x00", "handshake type 2"),
    (b"\x16\x03\x01\x00\x03\x01\x00\x00", "inside the handshake header"),
    (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", "legacy_version overruns"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "content type 0x47"),
]


@pytest.mark.parametrize(("data", "message"), BAD_RECORDS, ids=[m for _, m in BAD_RECORDS])
def test_malformed_records(data: bytes, message: str) -> None:
    with pytest.raises(TlsParseError, match=message):
        parse_client_hello(data)


BAD_HELLOS: list[tuple[bytes, str]] = [
    (hand_hello([], legacy_version=0x0203), "legacy_version 0x0203"),
    (hand_hello([], session_id=bytes(33)), "session_id length 33"),
    (hand_hello([], suites=b"\x13"), "cipher_suites length 1"),
    (hand_hello([], suites=b""), "cipher_suites length 0"),
    (hand_hello([], compression=b""), "no compression methods"),
    (hand_hello(None, trailing=b"\x00"), "extensions length overruns"),
    (hand_hello([], trailing=b"\x00"), "extensions length disagrees"),
    (hand_hello([(0, sni_ext((0, b"a.example")))], trailing=b"\x00\x00\x00"), "disagrees"),
    (hand_hello([(5, b""), (5, b"")]), "duplicate extension 5"),
    (hand_hello([(0, b"")]), "server_name list length overruns"),
    (hand_hello([(0, b"\x00\x00")]), "server_name: list length disagrees"),
    (hand_hello([(0, b"\x00\x09\x00\x00\x03abc")]), "server_name: list length disagrees"),
    (hand_hello([(0, b"\x00\x06\x00\x00\x05abc")]), "server_name overruns"),
    (hand_hello([(0, sni_ext((0, b"")))]), "empty host_name"),
    (hand_hello([(0, sni_ext((0, b"a"), (0, b"b")))]), "two names of type 0"),
    (hand_hello([(0, sni_ext((0, "bücher.de".encode())))]), "not printable ASCII"),
    (hand_hello([(0, sni_ext((0, b"a b")))]), "not printable ASCII"),
    (hand_hello([(0, sni_ext((0, b"a\x00b")))]), "not printable ASCII"),
    (hand_hello([(16, b"\x00\x00")]), "ALPN: list length disagrees"),
    (hand_hello([(16, b"\x00\x01\x00")]), "empty protocol name"),
    (hand_hello([(16, b"\x00\x03\x05h2")]), "ALPN protocol overruns"),
    (hand_hello([(43, b"\x03\x03\x04\x03")]), "supported_versions: bad list length"),
    (hand_hello([(43, b"\x00")]), "supported_versions: bad list length"),
    (hand_hello([(43, b"")]), "supported_versions length overruns"),
]


@pytest.mark.parametrize(("data", "message"), BAD_HELLOS, ids=[m for _, m in BAD_HELLOS])
def test_malformed_hellos(data: bytes, message: str) -> None:
    with pytest.raises(TlsParseError, match=message):
        parse_client_hello(data)


def test_truncated_extension_length_past_declared_end_is_malformed() -> None:
    good = hand_hello([(0, sni_ext((0, b"a.example"))), (21, bytes(40))])
    # Claim the padding extension is far longer than the message, then cut inside it.
    at = good.index(b"\x00\x15\x00\x28")
    bad = good[: at + 2] + b"\x10\x00" + good[at + 4 :]
    with pytest.raises(TlsParseError, match="extension 21 overruns"):
        parse_client_hello(bad[: at + 10])


def test_error_is_a_value_error() -> None:
    assert issubclass(TlsParseError, ValueError)


# --- fuzz ---------------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        pos = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:
            buf[pos] = rng.randrange(256)
        elif op == 1 and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 4))
        else:
            del buf[pos : pos + rng.randint(1, 4)]
    return bytes(buf[: rng.choice((CAPTURE, len(buf), rng.randint(0, len(buf))))])


def test_fuzz_only_tls_parse_error(hello: bytes) -> None:
    rng = random.Random(0x5EED)
    seeds = [hello, openssl_hello(alpn=["h2"]), openssl_hello(None)]
    parsed = errors = 0
    for i in range(3000):
        if i % 3 == 0:
            prefix = rng.choice((b"", b"\x16\x03\x01", b"\x16\x03\x01\x02\x00\x01"))
            data = prefix + rng.randbytes(rng.randint(0, 600))
        else:
            data = _mutate(rng, rng.choice(seeds))
        expected: str | None = None
        try:
            result = parse_client_hello(data)
        except TlsParseError:
            errors += 1
        else:
            assert isinstance(result, ClientHello)
            expected = result.sni
            parsed += 1
        # The callers on top must hold the same promise, and agree with the parser.
        assert describe_sni(data, None) == expected
        assert describe_sni(b"\x16\x03", data) == expected
        kind = guess_l7(data, data, remote_port=rng.randrange(65536), local_port=443)
        assert kind in (None, "http1", "http2", "tls", "dns", "other")
    # Both paths must actually be exercised for the loop to mean anything.
    assert parsed > 100
    assert errors > 100


# --- guess_l7 -----------------------------------------------------------------------------


def test_no_bytes_is_none() -> None:
    assert guess_l7(None, None, remote_port=443, local_port=40000) is None
    assert guess_l7(b"", b"", remote_port=53, local_port=40000) is None


def test_tls_client_hello_either_direction(hello: bytes) -> None:
    assert guess_l7(hello[:CAPTURE], None, remote_port=443, local_port=40000) == "tls"
    assert guess_l7(None, hello[:CAPTURE], remote_port=40000, local_port=443) == "tls"


@pytest.mark.parametrize("minor", [0, 1, 2, 3, 4])
def test_tls_server_hello_record(minor: int) -> None:
    rx = bytes([0x16, 0x03, minor, 0x00, 0x7A, 0x02]) + bytes(20)
    assert guess_l7(b"\x00\x01", rx, remote_port=8443, local_port=40000) == "tls"


@pytest.mark.parametrize(
    "chunk",
    [
        b"\x16\x03\x05\x00\x7a\x01",  # minor 5
        b"\x16\x02\x00\x00\x7a\x01",  # SSLv2-ish major
        b"\x17\x03\x03\x00\x20\x01",  # application data, not handshake
        b"\x16\x03\x03\x00\x00",  # empty record
        b"\x16\x03\x03\x40\x01",  # longer than 2^14
        b"\x16\x03\x03",  # header cut short
    ],
)
def test_not_tls(chunk: bytes) -> None:
    assert guess_l7(chunk, None, remote_port=443, local_port=40000) == "other"


@pytest.mark.parametrize(
    "method", ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"]
)
def test_http1_request(method: str) -> None:
    tx = f"{method} /x HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    assert guess_l7(tx, None, remote_port=8080, local_port=40000) == "http1"
    # Server side of the same connection: the request arrives on rx.
    assert guess_l7(None, tx, remote_port=40000, local_port=8080) == "http1"


@pytest.mark.parametrize("status", [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 404 Not Found\r\n"])
def test_http1_response(status: bytes) -> None:
    assert guess_l7(None, status, remote_port=80, local_port=40000) == "http1"


@pytest.mark.parametrize(
    "chunk",
    [b"get / HTTP/1.1\r\n", b"GETX / HTTP/1.1\r\n", b"GET", b"HTTP/2 200\r\n", b"FETCH / x"],
)
def test_not_http1(chunk: bytes) -> None:
    assert guess_l7(chunk, None, remote_port=80, local_port=40000) == "other"


def test_h2_preface() -> None:
    frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
    assert guess_l7(H2_PREFACE + frame, None, remote_port=80, local_port=4000) == "http2"
    assert guess_l7(None, H2_PREFACE, remote_port=4000, local_port=80) == "http2"


@pytest.mark.parametrize("n", [8, 9, 16, len(H2_PREFACE) - 1])
def test_h2_preface_prefix(n: int) -> None:
    assert guess_l7(H2_PREFACE[:n], None, remote_port=80, local_port=4000) == "http2"


def test_h2_preface_prefix_too_short() -> None:
    assert guess_l7(H2_PREFACE[:7], None, remote_port=80, local_port=4000) == "other"


def test_h2_preface_beats_http1_response() -> None:
    result = guess_l7(H2_PREFACE, b"HTTP/1.1 400 Bad Request\r\n", remote_port=80, local_port=1)
    assert result == "http2"


def test_tls_beats_http1() -> None:
    rx = b"\x16\x03\x03\x00\x7a\x02" + bytes(10)
    assert guess_l7(b"GET / HTTP/1.1\r\n", rx, remote_port=80, local_port=40000) == "tls"


def dns_query(name: bytes = b"\x07example\x03com\x00", *, flags: int = 0x0100) -> bytes:
    msg = struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
    return struct.pack("!H", len(msg)) + msg


def test_dns_over_tcp_on_port_53() -> None:
    assert guess_l7(dns_query(), None, remote_port=53, local_port=40000) == "dns"


def test_dns_over_tcp_framing_on_other_port() -> None:
    assert guess_l7(dns_query(), None, remote_port=5353, local_port=40000) == "dns"
    response = dns_query(flags=0x8180)
    assert guess_l7(None, response, remote_port=40000, local_port=1053) == "dns"


@pytest.mark.parametrize(
    "chunk",
    [
        dns_query(flags=0x1100),  # opcode 2 (STATUS) carries no question
        dns_query(flags=0x0140),  # Z bit set
        dns_query(b"\x40" + b"a" * 64 + b"\x00"),  # label longer than 63
        dns_query(b"\xc0\x0c"),  # compression pointer as the first name
        dns_query(b"\x07example"),  # name runs into the question fields
        dns_query()[:-3],  # class cut off
        dns_query()[:6] + b"\x00\x02" + dns_query()[8:],  # two questions
        dns_query()[:-2] + b"\x00\x07",  # unknown class
        b"\x00\x05hello",
    ],
)
def test_not_dns_framing_off_port_53(chunk: bytes) -> None:
    assert guess_l7(chunk, None, remote_port=5353, local_port=40000) == "other"


def test_port_53_alone_is_dns() -> None:
    assert guess_l7(b"\x00\x05hello", None, remote_port=53, local_port=40000) == "dns"
    assert guess_l7(None, b"\x00", remote_port=40000, local_port=53) == "dns"


def test_port_53_does_not_override_byte_evidence(hello: bytes) -> None:
    assert guess_l7(hello, None, remote_port=53, local_port=40000) == "tls"
    assert guess_l7(b"GET / HTTP/1.1\r\n", None, remote_port=53, local_port=1) == "http1"


def test_other() -> None:
    assert guess_l7(b"SSH-2.0-OpenSSH_9.6\r\n", None, remote_port=22, local_port=1) == "other"
    assert guess_l7(None, b"\x00\x00\x00\x01", remote_port=6379, local_port=1) == "other"


# --- describe_sni -------------------------------------------------------------------------


def test_describe_sni_either_side(hello: bytes) -> None:
    assert describe_sni(hello, None) == HOST
    assert describe_sni(None, hello[:CAPTURE]) == HOST
    assert describe_sni(b"garbage", hello) == HOST
    assert describe_sni(b"\x16\x03\x03\x00\x7a\x02" + bytes(30), hello[:CAPTURE]) == HOST


def test_describe_sni_none() -> None:
    assert describe_sni(None, None) is None
    assert describe_sni(b"", b"") is None
    assert describe_sni(openssl_hello(None), None) is None
    assert describe_sni(openssl_hello()[:100], b"HTTP/1.1 200 OK\r\n") is None
    assert describe_sni(b"\x16\x03\x01\xff\xff", bytes(600)) is None
