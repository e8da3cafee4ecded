"""HTTP/2 floods through the real proxy (issue 15, item 6): a client sending SETTINGS,
PING, RST_STREAM (rapid reset), empty DATA or CONTINUATION frames past the limits gets
GOAWAY ENHANCE_YOUR_CALM and is closed (counted); a rapid reset makes one summary record,
not one per stream; a good client on another connection gets its exact response."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from proxy_support import (
    LOCALHOST,
    Recorder,
    UpstreamPki,
    make_pki,
    proxied,
    run,
    transparent_port,
)

from flowtap.protocols.http2 import PREFACE
from flowtap.protocols.messages import Transaction
from flowtap.proxy import CertificateAuthority, EgressProxy

SCALE = float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))
TIMEOUT = 30.0 * SCALE
ANSWERED = "/hi"  # the upstream answers this path; it never answers others
REQUEST = [(":method", "GET"), (":scheme", "http"), (":authority", "up.test")]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca") / "state")


@dataclass
class H2Upstream:
    """A cleartext HTTP/2 server (h2 state machine): answers GET /hi with 200 "h2 says
    hi", leaves other requests unanswered, counts the resets it received."""

    table_size: int | None = None  # SETTINGS_HEADER_TABLE_SIZE to advertise
    resets: int = 0
    done: int = 0  # connections that ended
    server: asyncio.Server | None = None
    port: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self, context: ssl.SSLContext | None = None) -> H2Upstream:
        self.server = await asyncio.start_server(self._handle, LOCALHOST, 0, ssl=context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2.connection.H2Connection(config)
        if self.table_size is not None:
            conn.local_settings = h2.settings.Settings(
                client=False, initial_values={SettingCodes.HEADER_TABLE_SIZE: self.table_size}
            )
            # Advertised as the initial value: h2 applies it to its decoder on no ACK.
            conn.decoder.max_allowed_table_size = self.table_size
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        self.writers.add(writer)
        paths: dict[int, bytes] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        paths[event.stream_id] = dict(event.headers).get(b":path", b"")
                    elif isinstance(event, h2.events.StreamReset):
                        self.resets += 1
                    elif (
                        isinstance(event, h2.events.StreamEnded)
                        and paths.pop(event.stream_id, b"") == ANSWERED.encode()
                    ):
                        conn.send_headers(event.stream_id, [(":status", "200")])
                        conn.send_data(event.stream_id, b"h2 says hi", end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.done += 1
            self.writers.discard(writer)
            writer.close()


async def good_request(port: int) -> tuple[bytes | None, bytes]:
    """One GET /hi over its own connection, with the h2 client state machine."""
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [*REQUEST, (":path", ANSWERED)], end_stream=True)
    writer.write(conn.data_to_send())
    status, body, ended = None, b"", False
    try:
        while not ended:
            data = await reader.read(65536)
            assert data, "connection closed before the response ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(len(event.data), event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return status, body


def headers(stream_id: int, encoder: Encoder, path: str, *, end_headers: bool = True) -> bytes:
    flags = ["END_STREAM", *(["END_HEADERS"] if end_headers else [])]
    block = encoder.encode([*REQUEST, (":path", path)])
    return HeadersFrame(stream_id, block, flags=flags).serialize()


def flood(kind: str, count: int) -> bytes:
    """The client preface and SETTINGS, then ``count`` frames of one flood."""
    out = [PREFACE, SettingsFrame(0).serialize()]
    encoder = Encoder()
    if kind == "settings":
        out += [SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}).serialize()] * count
    elif kind == "ping":
        out += [PingFrame(0, opaque_data=b"12345678").serialize()] * count
    elif kind == "rapid-reset":
        for index in range(count):
            out.append(headers(2 * index + 1, encoder, "/slow"))
            out.append(RstStreamFrame(2 * index + 1, error_code=0x8).serialize())
    elif kind == "empty-data":
        block = encoder.encode([*REQUEST, (":path", "/upload")])
        out.append(HeadersFrame(1, block, flags=["END_HEADERS"]).serialize())
        out += [DataFrame(1, b"").serialize()] * count
    elif kind == "continuation":
        block = encoder.encode([*REQUEST, (":path", "/big")])
        out.append(HeadersFrame(1, block, flags=["END_STREAM"]).serialize())
        out += [ContinuationFrame(1, b"\x40\x01a\x01b").serialize()] * count
    return b"".join(out)


def frames(data: bytes) -> list[Frame]:
    out: list[Frame] = []
    pos = 0
    while len(data) - pos >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        out.append(frame)
        pos += 9 + length
    assert pos == len(data), "the proxy cut a frame"
    return out


async def send_and_read_all(port: int, data: bytes, context: ssl.SSLContext | None = None) -> bytes:
    """Sends ``data``, then reads until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection(
        LOCALHOST, port, ssl=context, server_hostname="localhost" if context else None
    )
    writer.write(data)
    received = bytearray()
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        pass
    writer.close()
    return bytes(received)


FLOODS = {  # kind: (frames sent, stream the GOAWAY names as the last one)
    "settings": (1000, 0),
    "ping": (1000, 0),
    "rapid-reset": (1000, 401),  # the 201st reset is over the burst of 200
    "empty-data": (1000, 1),
    "continuation": (200, 1),
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_flood_gets_goaway_and_a_good_client_its_response(
    ca: CertificateAuthority, kind: str
) -> None:
    count, last_stream = FLOODS[kind]

    async def main() -> None:
        upstream = await H2Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            port = transparent_port(proxy)
            received = await send_and_read_all(port, flood(kind, count))
            got = frames(received)
            goaway = got[-1]
            assert isinstance(goaway, GoAwayFrame), got[-3:]
            assert (goaway.error_code, goaway.last_stream_id) == (0xB, last_stream)
            assert sum(isinstance(f, GoAwayFrame) for f in got) == 1
            assert await good_request(port) == (b"200", b"h2 says hi")
            closes = await recorder.wait_closes(2, TIMEOUT)
            counters = proxy.counters()
        await upstream.close()
        assert counters["h2_flood_closed"] == 1
        flooded = next(c for c in closes if c.error and "HTTP/2 flood" in c.error)
        assert "GOAWAY ENHANCE_YOUR_CALM" in (flooded.error or "")
        others = [
            tx
            for tx, ctx in recorder.transactions
            if ctx.connection_id != flooded.context.connection_id
        ]
        (tx,) = others  # the good client's
        assert tx.response is not None and bytes(tx.response.body.data) == b"h2 says hi"

    run(main(), TIMEOUT)


def _flooded_records(recorder: Recorder, connection_id: int) -> list[Transaction]:
    return [tx for tx, ctx in recorder.transactions if ctx.connection_id == connection_id]


def test_rapid_reset_flood_is_one_record_with_its_count(ca: CertificateAuthority) -> None:
    """1,000 streams opened and reset at once: closed after the 200 the burst allows, and
    what was relayed of them is one record whose count is what the upstream received."""

    async def main() -> None:
        upstream = await H2Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            await send_and_read_all(transparent_port(proxy), flood("rapid-reset", 1000))
            (closed,) = await recorder.wait_closes(1, TIMEOUT)
            async with asyncio.timeout(TIMEOUT):
                while upstream.done < 1:
                    await asyncio.sleep(0.01)
        await upstream.close()
        records = _flooded_records(recorder, closed.context.connection_id)
        (summary,) = [tx for tx in records if tx.count > 1]
        assert summary.count == upstream.resets >= 200
        assert (summary.stream_id, summary.error) == (1, "reset: CANCEL")
        assert summary.request is not None and summary.request.target == "/slow"
        # Besides it, at most the stream opened by the frame before the refused reset.
        assert [tx.stream_id for tx in records if tx.count == 1] == [2 * summary.count + 1]

    run(main(), TIMEOUT)


def test_resets_under_the_limit_are_relayed_and_summed_up(ca: CertificateAuthority) -> None:
    """150 streams reset at once (within the burst) and a request after them on the same
    connection: no GOAWAY, the request answered, two records: the summary (count 150) and
    the request's."""
    count = 150

    async def main() -> None:
        upstream = await H2Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            data = flood("rapid-reset", count)
            encoder = Encoder()  # a new encoder: the flood's blocks used no dynamic table
            data += headers(2 * count + 1, encoder, ANSWERED)
            writer.write(data)
            received = bytearray()
            while not any(
                isinstance(f, DataFrame) and f.stream_id == 2 * count + 1
                for f in frames(bytes(received))
            ):
                chunk = await reader.read(65536)
                assert chunk, "closed before the answer"
                received += chunk
            writer.close()
            (closed,) = await recorder.wait_closes(1, TIMEOUT)
            counters = proxy.counters()
        await upstream.close()
        assert counters["h2_flood_closed"] == 0 and closed.error is None
        assert not any(isinstance(f, GoAwayFrame) for f in frames(bytes(received)))
        records = recorder.transactions
        assert len(records) == 2
        answered = next(tx for tx, _ in records if tx.count == 1)
        summary = next(tx for tx, _ in records if tx.count == count)
        assert answered.stream_id == 2 * count + 1 and answered.response is not None
        assert bytes(answered.response.body.data) == b"h2 says hi"
        assert (summary.stream_id, summary.error) == (1, "reset: CANCEL")

    run(main(), TIMEOUT)


def test_good_client_during_a_ping_flood(ca: CertificateAuthority) -> None:
    """A good client connected before the flood keeps working on its connection."""

    async def main() -> None:
        upstream = await H2Upstream().start()
        recorder = Recorder()
        proxy: EgressProxy
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            port = transparent_port(proxy)
            flooding = asyncio.ensure_future(send_and_read_all(port, flood("ping", 5000)))
            results = [await good_request(port) for _ in range(5)]
            await flooding
            counters = proxy.counters()
        await upstream.close()
        assert results == [(b"200", b"h2 says hi")] * 5
        assert counters["h2_flood_closed"] == 1

    run(main(), TIMEOUT)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> UpstreamPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_flood_inside_intercepted_tls(ca: CertificateAuthority, pki: UpstreamPki) -> None:
    """h2 negotiated by ALPN in TLS the proxy terminates: the same guard, the GOAWAY sent
    inside the TLS session."""

    async def main() -> None:
        upstream = await H2Upstream().start(pki.server_context(["h2"]))
        recorder = Recorder()
        client_tls = ssl.create_default_context(cadata=ca.cert_pem.decode())
        client_tls.set_alpn_protocols(["h2"])
        async with proxied(
            ca, (LOCALHOST, upstream.port), recorder, upstream_ca=pki.ca_file
        ) as proxy:
            received = await send_and_read_all(
                transparent_port(proxy), flood("settings", 1000), client_tls
            )
            (closed,) = await recorder.wait_closes(1, TIMEOUT)
            counters = proxy.counters()
        await upstream.close()
        goaway = frames(received)[-1]
        assert isinstance(goaway, GoAwayFrame) and goaway.error_code == 0xB
        assert counters["h2_flood_closed"] == 1
        assert closed.outcome == "intercepted" and closed.context.alpn == "h2"

    run(main(), TIMEOUT)


def test_hpack_table_bomb_stops_the_record_not_the_connection(ca: CertificateAuthority) -> None:
    """Issue 15, item 7, through the proxy: the upstream allows a 4 GiB HPACK table, the
    client's encoder fills it. The proxy's parser stops at its cap (counted as
    http2_header_limit, no memory taken), the connection goes on and is answered."""

    async def main() -> None:
        upstream = await H2Upstream(table_size=2**32 - 1).start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            writer.write(PREFACE + SettingsFrame(0).serialize())
            received = bytearray()
            while not any(
                isinstance(f, SettingsFrame) and "ACK" not in f.flags
                for f in frames(bytes(received))
            ):
                chunk = await reader.read(65536)
                assert chunk, "closed before the server's SETTINGS"
                received += chunk
            encoder = Encoder()
            encoder.header_table_size = 2**32 - 1
            wire = [SettingsFrame(0, flags=["ACK"]).serialize()]
            for index in range(50):  # each block adds a 4 KB entry to the table
                block = encoder.encode([*REQUEST, (":path", ANSWERED), (f"x-{index}", "b" * 4000)])
                flags = ["END_STREAM", "END_HEADERS"]
                wire.append(HeadersFrame(2 * index + 1, block, flags=flags).serialize())
            writer.write(b"".join(wire))
            answered: set[int] = set()
            while len(answered) < 50:
                chunk = await reader.read(65536)
                assert chunk, "closed before the answers"
                received += chunk
                answered = {
                    f.stream_id
                    for f in frames(bytes(received))
                    if isinstance(f, DataFrame) and "END_STREAM" in f.flags
                }
            writer.close()
            await recorder.wait_closes(1, TIMEOUT)
            assert await good_request(transparent_port(proxy)) == (b"200", b"h2 says hi")
            await recorder.wait_closes(2, TIMEOUT)
            counters = proxy.counters()
        await upstream.close()
        assert (counters["http2_header_limit"], counters["parser_errors"]) == (1, 1)
        assert counters["h2_flood_closed"] == 0
        # The bomb's first 16 blocks fit in the 64 KiB table cap (an :authority entry of
        # 49 bytes, 10 of 4,035 and 6 of 4,036): recorded; the 17th stopped the parser.
        bomb_id = recorder.closes()[0].context.connection_id
        bomb = [t for t, c in recorder.transactions if c.connection_id == bomb_id]
        assert [t.stream_id for t in bomb] == list(range(1, 33, 2))
        ((tx, _),) = [(t, c) for t, c in recorder.transactions if c.connection_id != bomb_id]
        assert tx.request is not None and tx.request.target == ANSWERED
        assert tx.response is not None and bytes(tx.response.body.data) == b"h2 says hi"

    run(main(), TIMEOUT)


def test_flood_after_the_server_spoke_first(ca: CertificateAuthority) -> None:
    """An HTTP/2 server sends its SETTINGS on accept: a client that waits for them before
    its preface finds the proxy relaying as for a server-first protocol. The guard still
    applies once the client's first bytes are the preface."""

    async def main() -> None:
        upstream = await H2Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            first = await reader.read(65536)
            assert isinstance(frames(first)[0], SettingsFrame)  # the server spoke first
            writer.write(flood("ping", 1000))
            received = bytearray(first)
            with contextlib.suppress(ConnectionResetError):
                while chunk := await reader.read(65536):
                    received += chunk
            writer.close()
            await recorder.wait_closes(1, TIMEOUT)
            counters = proxy.counters()
        await upstream.close()
        goaway = frames(bytes(received))[-1]
        assert isinstance(goaway, GoAwayFrame) and goaway.error_code == 0xB
        assert (counters["server_first"], counters["h2_flood_closed"]) == (1, 1)

    run(main(), TIMEOUT)
