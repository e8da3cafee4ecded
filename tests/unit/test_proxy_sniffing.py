"""The proxy decides what a client speaks by the grammar, never by timing (issue 15, item
4): a smuggled request after a pause, behind leading empty lines or with an extension
method is refused exactly as any other, in plaintext and inside intercepted TLS."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from proxy_support import (
    LOCALHOST,
    Recorder,
    Upstream,
    make_pki,
    proxied,
    read_response,
    run,
    transparent_port,
)

from flowtap.proxy import CertificateAuthority
from flowtap.proxy.sniff import classify

CL_TE = (
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nG"
)
SHAPES = {
    "leading-crlf": b"\r\n" + CL_TE,
    "leading-crlfs": b"\r\n\r\n\r\n" + CL_TE,
    "purge": CL_TE.replace(b"POST", b"PURGE", 1),
    "extension-method": CL_TE.replace(b"POST", b"FROBNICATE", 1),
}
PAUSE_S = 1.3  # longer than the former one-second "silent client" relay


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca") / "state")


async def _send(writer: asyncio.StreamWriter, raw: bytes, timing: str) -> None:
    if timing == "silence-first":
        await asyncio.sleep(PAUSE_S)
    if timing == "pause-mid-line":
        writer.write(raw[:3])
        await writer.drain()
        await asyncio.sleep(PAUSE_S)
        raw = raw[3:]
    writer.write(raw)
    await writer.drain()


@pytest.mark.parametrize("timing", ["at-once", "silence-first", "pause-mid-line"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_smuggling_refused_whatever_the_shape_and_timing(
    ca: CertificateAuthority, shape: str, timing: str
) -> None:
    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            await _send(writer, SHAPES[shape], timing)
            resp = await read_response(reader)
            writer.close()
            closes = await recorder.wait_closes(1)
            counters = proxy.counters()
        await upstream.close()
        assert resp.status == 400
        assert counters["refused_smuggling"] == 1 and counters["relayed"] == 0
        assert closes[0].context.l7_protocol == "http1"
        assert all(not bytes(r) for r in upstream.received)  # not one byte went upstream

    run(main())


def test_leading_empty_line_and_extension_method_are_forwarded_and_recorded(
    ca: CertificateAuthority,
) -> None:
    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            await asyncio.sleep(PAUSE_S)
            writer.write(b"\r\nPURGE /cache HTTP/1.1\r\nHost: a\r\n\r\n")
            resp = await read_response(reader)
            writer.close()
            await recorder.wait_closes(1)
        await upstream.close()
        assert resp.status == 200 and resp.json()["method"] == "PURGE"
        ((tx, ctx),) = recorder.transactions
        assert tx.request is not None and tx.request.method == "PURGE"
        assert ctx.l7_protocol == "http1"

    run(main())


@pytest.mark.parametrize("timing", ["at-once", "silence-first", "pause-mid-line"])
def test_smuggling_refused_inside_intercepted_tls(
    ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory, timing: str
) -> None:
    pki = make_pki(tmp_path_factory.mktemp("pki"))

    async def main() -> None:
        upstream = await Upstream().start(pki.server_context(["http/1.1"]))
        recorder = Recorder()
        async with proxied(
            ca, (LOCALHOST, upstream.port), recorder, upstream_ca=pki.ca_file
        ) as proxy:
            context = ssl.create_default_context()
            context.load_verify_locations(cadata=ca.cert_pem.decode())
            reader, writer = await asyncio.open_connection(
                LOCALHOST, transparent_port(proxy), ssl=context, server_hostname="localhost"
            )
            await _send(writer, SHAPES["leading-crlf"].replace(b"POST", b"PURGE"), timing)
            resp = await read_response(reader)
            writer.close()
            closes = await recorder.wait_closes(1)
            counters = proxy.counters()
        await upstream.close()
        assert resp.status == 400
        assert counters["refused_smuggling"] == 1
        assert closes[0].context.l7_protocol == "http1" and closes[0].context.tls
        assert upstream.requests == []
        assert all(b"PURGE" not in bytes(r) for r in upstream.received)

    run(main())


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"PING\r\n", "other"),
        (b"SET k v\r\n", "other"),
        (b"\x00\x01binary", "other"),
        (b"\r\nFOO / HTTP/1.1\r\n", "http1"),
        (b"GET /\r\n", "http1"),
        (b"PURG", None),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http2"),
        (b"\x16\x03\x01\x00\x02\x01\x00", None),  # a ClientHello's first fragment
        (b"\x16\x03\x01\x00\x02\x01\x00\x16\x03\x01\x00\x03\x00\x01\x00", "tls"),
    ],
)
def test_classify(data: bytes, kind: str | None) -> None:
    assert classify(data, 65536) == kind
