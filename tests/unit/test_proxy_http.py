"""The egress proxy with plain HTTP: forwarding, limits, smuggling, timeouts, 502, explicit."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from proxy_support import (
    CLIENT_PID,
    LOCALHOST,
    Recorder,
    Upstream,
    exchange,
    proxied,
    read_response,
    run,
    transparent_port,
)

from flowtap.proxy import CertificateAuthority, EgressProxy, Limits, ProxyConfig
from flowtap.proxy.records import egress_connection_record, egress_http_record
from flowtap.records.connection import WallClock
from flowtap.records.http import HttpRecordOptions

PROCESS = {"pid": CLIENT_PID, "exe": "/usr/bin/client"}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca") / "state")


def _explicit_port(proxy: EgressProxy) -> int:
    assert proxy.explicit_address is not None
    return proxy.explicit_address[1]


REQUEST = (
    b"POST /submit?x=1 HTTP/1.1\r\n"
    b"host: example.test\r\n"
    b"X-Custom-Case: KeepMe\r\n"
    b"Authorization: Bearer secret-token\r\n"
    b"content-type: text/plain\r\n"
    b"Content-Length: 11\r\n"
    b"\r\n"
    b"hello world"
)


def test_forwarded_byte_for_byte_and_recorded(ca: CertificateAuthority) -> None:
    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            resp = await exchange(transparent_port(proxy), REQUEST)
            assert resp.status == 200
            assert resp.json()["body_size"] == 11
            assert bytes(upstream.received[0]) == REQUEST  # headers in order, case kept
            closes = await recorder.wait_closes(1)
        await upstream.close()
        ((tx, ctx),) = recorder.transactions
        assert tx.request is not None and tx.response is not None
        assert (tx.request.method, tx.request.target) == ("POST", "/submit?x=1")
        assert bytes(tx.request.body.data) == b"hello world"
        assert tx.response.status == 200
        assert ctx.pid == CLIENT_PID and ctx.destination == (LOCALHOST, upstream.port)
        record = egress_http_record(
            tx, ctx, PROCESS, HttpRecordOptions(level="headers"), WallClock()
        )
        assert record is not None
        assert record["capture_source"] == "egress" and record["direction"] == "egress"
        assert record["request"]["url"] == "http://example.test/submit?x=1"
        assert ["Authorization", "Bearer [REDACTED]"] in record["request"]["headers"]
        assert closes[0].outcome == "intercepted"
        assert closes[0].bytes_from_client == len(REQUEST)
        conn = egress_connection_record(closes[0], PROCESS, WallClock())
        assert conn["egress"]["outcome"] == "intercepted" and conn["l7_protocol"] == "http1"

    run(main())


def test_keep_alive_serves_many_requests_on_one_connection(ca: CertificateAuthority) -> None:
    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            for i in range(5):
                writer.write(f"GET /n/{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                resp = await read_response(reader)
                assert resp.json()["path"] == f"/n/{i}"
            writer.write(b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await read_response(reader)).body == b"hello world"
            writer.write(b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await read_response(reader, method="HEAD")).status == 200
            writer.write(b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await read_response(reader)).body == b"until the end"
            writer.close()
            await recorder.wait_closes(1)
        await upstream.close()
        assert len(upstream.received) == 1  # one upstream connection for all
        paths = [tx.request.target for tx, _ in recorder.transactions if tx.request]
        assert paths == [*(f"/n/{i}" for i in range(5)), "/chunked", "/head", "/close"]

    run(main())


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\nX-Bare-LF: 1\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nab\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabcX\r\n0\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Many: 1\r\n" * 150 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n", 431),
    ],
    ids=[
        "cl-and-te",
        "duplicate-cl",
        "cl-list",
        "te-gzip",
        "te-not-final-chunked",
        "space-before-colon",
        "obs-fold",
        "bare-lf",
        "bad-chunk-size",
        "chunk-without-crlf",
        "no-host",
        "http2-version",
        "too-many-headers",
        "head-too-large",
    ],
)
def test_refused_while_others_are_served(
    ca: CertificateAuthority, request_bytes: bytes, status: int
) -> None:
    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            # A well-behaved client keeps its connection open throughout.
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            writer.write(b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await read_response(reader)).status == 200
            resp = await exchange(transparent_port(proxy), request_bytes)
            assert resp.status == status
            assert resp.header("connection") == "close"
            writer.write(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await read_response(reader)).status == 200
            writer.close()
            counters = proxy.counters()
        await upstream.close()
        refused = (
            counters["refused_smuggling"]
            + counters["refused_bad_request"]
            + counters["refused_header_too_large"]
        )
        assert refused == 1
        # The refused request never reached the upstream whole (a head with valid framing is
        # streamed on before a bad chunk in its body is seen; that connection is then cut).
        assert all(request_bytes not in bytes(r) for r in upstream.received)

    run(main())


def test_slow_client_is_timed_out(ca: CertificateAuthority) -> None:
    config = ProxyConfig(limits=Limits(header_timeout=0.5))

    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder, config) as proxy:
            slow_reader, slow_writer = await asyncio.open_connection(
                LOCALHOST, transparent_port(proxy)
            )
            slow_writer.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n")  # never finished
            # Others are served meanwhile.
            assert (
                await exchange(transparent_port(proxy), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            ).status == 200
            resp = await read_response(slow_reader)
            assert resp.status == 408
            assert await slow_reader.read() == b""
            slow_writer.close()
            assert proxy.counters()["timeouts_header"] == 1

    run(main())


def test_refused_upstream_gets_502(ca: CertificateAuthority) -> None:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        closed_port = probe.getsockname()[1]  # bound, never listening: connections refused

        async def main() -> None:
            recorder = Recorder()
            async with proxied(ca, (LOCALHOST, closed_port), recorder) as proxy:
                resp = await exchange(
                    transparent_port(proxy), b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
                )
                assert resp.status == 502
                assert "refused" in (resp.header("x-flowtap-error") or "").lower()
                closes = await recorder.wait_closes(1)
                counters = proxy.counters()
            assert closes[0].outcome == "upstream_failed" and closes[0].error
            assert counters["responses_502"] == 1 and counters["upstream_failed"] == 1
            ((tx, _),) = recorder.transactions
            assert tx.response is not None and tx.response.status == 502

        run(main())


def _memory_bounded(work: Callable[[], None], limit: int) -> int:
    tracemalloc.start()
    try:
        work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak} bytes"
    return peak


def test_large_bodies_stream_with_bounded_memory(ca: CertificateAuthority) -> None:
    size = 8 << 20
    config = ProxyConfig(http=HttpRecordOptions(level="full", max_body_bytes=1024))

    async def main() -> None:
        upstream = await Upstream(keep=4096).start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder, config) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            writer.write(
                f"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n".encode()
            )
            chunk = bytes(range(256)) * 256
            digest = hashlib.sha256()
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                digest.update(chunk)
                await writer.drain()
            resp = await read_response(reader)
            assert resp.json()["body_size"] == size
            assert resp.json()["body_sha256"] == digest.hexdigest()
            writer.write(f"GET /download/{size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            resp = await read_response(reader, discard_body=True)
            assert resp.status == 200
            writer.close()
            await recorder.wait_closes(1)
        await upstream.close()
        sizes = [
            (tx.request.body.size if tx.request else 0, tx.response.body.size if tx.response else 0)
            for tx, _ in recorder.transactions
        ]
        assert sizes[0][0] == size  # the upload, seen whole by the parser (kept: 1 KiB)
        assert sizes[1][1] == size  # the download

    _memory_bounded(lambda: run(main(), timeout=60), 4 << 20)


def test_explicit_absolute_form(ca: CertificateAuthority) -> None:
    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, ("0.0.0.0", 1), recorder) as proxy:
            request = (
                f"GET http://{LOCALHOST}:{upstream.port}/via-proxy?q=1 HTTP/1.1\r\n"
                f"Host: {LOCALHOST}:{upstream.port}\r\nX-A: 1\r\n\r\n"
            ).encode()
            resp = await exchange(_explicit_port(proxy), request)
            assert resp.status == 200 and resp.json()["path"] == "/via-proxy?q=1"
            # Only the request line became origin-form; the rest went as sent.
            assert (
                bytes(upstream.received[0])
                == (
                    f"GET /via-proxy?q=1 HTTP/1.1\r\n"
                    f"Host: {LOCALHOST}:{upstream.port}\r\nX-A: 1\r\n\r\n"
                ).encode()
            )
            refused = await exchange(
                _explicit_port(proxy), b"GET /origin-form HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            assert refused.status == 400
            await recorder.wait_closes(2)
        await upstream.close()
        ((tx, ctx),) = recorder.transactions
        assert ctx.mode == "explicit" and ctx.destination == (LOCALHOST, upstream.port)
        record = egress_http_record(tx, ctx, PROCESS, HttpRecordOptions(), WallClock())
        assert record is not None
        assert record["request"]["url"] == f"http://{LOCALHOST}:{upstream.port}/via-proxy?q=1"

    run(main())


def test_explicit_connect_with_plain_http_inside(ca: CertificateAuthority) -> None:
    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, ("0.0.0.0", 1), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, _explicit_port(proxy))
            writer.write(
                f"CONNECT {LOCALHOST}:{upstream.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writer.write(b"GET /tunnelled HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(reader)).json()["path"] == "/tunnelled"
            writer.close()
            closes = await recorder.wait_closes(1)
        await upstream.close()
        assert bytes(upstream.received[0]) == b"GET /tunnelled HTTP/1.1\r\nHost: t\r\n\r\n"
        assert closes[0].context.mode == "explicit" and closes[0].outcome == "intercepted"

    run(main())


def test_non_http_is_relayed_untouched(ca: CertificateAuthority) -> None:
    async def main() -> None:
        got = bytearray()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(100)
            got.extend(data)
            writer.write(data.upper())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, LOCALHOST, 0)
        port = server.sockets[0].getsockname()[1]
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            writer.write(b"\x00\x01binary protocol")
            assert await reader.read() == b"\x00\x01BINARY PROTOCOL"
            writer.close()
            closes = await recorder.wait_closes(1)
        server.close()
        assert bytes(got) == b"\x00\x01binary protocol"
        assert closes[0].outcome == "relayed" and closes[0].bytes_from_client == 17

    run(main())


def test_a_server_that_speaks_first_is_heard_at_once(ca: CertificateAuthority) -> None:
    """SMTP-style: the upstream greets first. The proxy connected upstream while it waited
    for the client, so the greeting arrives long before the sniff timeout (10 s here),
    and the upstream sees one connection per client connection."""

    async def main() -> None:
        accepted = 0

        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            writer.write(b"220 upstream ready\r\n")
            line = await reader.readline()
            writer.write(b"250 " + line)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, LOCALHOST, 0)
        port = server.sockets[0].getsockname()[1]
        recorder = Recorder()
        config = ProxyConfig()
        async with proxied(ca, (LOCALHOST, port), recorder, config) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            async with asyncio.timeout(2.0):
                assert await reader.readline() == b"220 upstream ready\r\n"
            writer.write(b"HELO client\r\n")
            assert await reader.read() == b"250 HELO client\r\n"
            writer.close()
            closes = await recorder.wait_closes(1)
            assert proxy.counters()["server_first"] == 1
        server.close()
        assert accepted == 1
        assert closes[0].outcome == "relayed"

    run(main())


def test_one_upstream_connection_per_intercepted_client(ca: CertificateAuthority) -> None:
    """The early connection carries the client's HTTP: no second upstream connection."""

    async def main() -> None:
        accepted = 0

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, LOCALHOST, 0)
        port = server.sockets[0].getsockname()[1]
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 204")
            writer.close()
            await recorder.wait_closes(1)
        server.close()
        assert accepted == 1

    run(main())


def test_direct_connection_to_the_listener_is_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    async def main() -> None:
        recorder = Recorder()
        proxy = EgressProxy(ProxyConfig(), ca, on_connection=recorder.on_connection)
        # Default SO_ORIGINAL_DST on a socket nobody redirected: no destination, refused.
        async with proxy:
            reader, _ = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            assert await reader.read() == b""
            await asyncio.sleep(0.05)
            assert (
                proxy.counters()["refused_no_destination"] + proxy.counters()["refused_loop"] == 1
            )

    run(main())


def test_capture_level_none_parses_nothing(ca: CertificateAuthority) -> None:
    config = replace(ProxyConfig(), http=HttpRecordOptions(level="none"))

    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder, config) as proxy:
            assert (
                await exchange(transparent_port(proxy), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            ).status == 200
            await recorder.wait_closes(1)
        await upstream.close()
        assert recorder.transactions == []

    run(main())
