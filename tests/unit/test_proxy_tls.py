"""The egress proxy with TLS: interception with a leaf per SNI, ALPN mirrored from the
upstream (HTTP/2 relayed and recorded), upstream verification, passthrough after a client
rejected our certificate."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from proxy_support import (
    CLIENT_PID,
    LOCALHOST,
    Recorder,
    Upstream,
    UpstreamPki,
    make_pki,
    proxied,
    read_response,
    run,
    transparent_port,
)

from flowtap.proxy import CertificateAuthority
from flowtap.proxy.records import egress_http_record
from flowtap.records.connection import WallClock
from flowtap.records.http import HttpRecordOptions


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> UpstreamPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca") / "state")


def trusting(ca_pem: bytes | Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if isinstance(ca_pem, Path):
        ctx.load_verify_locations(cafile=str(ca_pem))
    else:
        ctx.load_verify_locations(cadata=ca_pem.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _issuer_cn(writer: asyncio.StreamWriter) -> str:
    cert = writer.get_extra_info("peercert")
    return dict(x[0] for x in cert["issuer"])["commonName"]  # type: ignore[no-any-return]


def test_tls_intercepted_with_a_leaf_for_the_sni(
    ca: CertificateAuthority, pki: UpstreamPki
) -> None:
    request = b"GET /secure HTTP/1.1\r\nHost: localhost\r\nX-Order: 1\r\nx-order: 2\r\n\r\n"

    async def main() -> None:
        upstream = await Upstream().start(pki.server_context(["http/1.1"]))
        recorder = Recorder()
        async with proxied(
            ca, (LOCALHOST, upstream.port), recorder, upstream_ca=pki.ca_file
        ) as proxy:
            reader, writer = await asyncio.open_connection(
                LOCALHOST,
                transparent_port(proxy),
                ssl=trusting(ca.cert_pem, ["h2", "http/1.1"]),
                server_hostname="localhost",
            )
            # The upstream only speaks http/1.1: that is what the client is offered.
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
            assert _issuer_cn(writer) == "flowtap local egress CA"
            writer.write(request)
            resp = await read_response(reader)
            assert resp.status == 200 and resp.json()["path"] == "/secure"
            writer.close()
            closes = await recorder.wait_closes(1)
        await upstream.close()
        assert bytes(upstream.received[0]) == request
        ((tx, ctx),) = recorder.transactions
        assert ctx.tls and ctx.sni == "localhost" and ctx.alpn == "http/1.1"
        record = egress_http_record(tx, ctx, {"pid": 7}, HttpRecordOptions(), WallClock())
        assert record is not None and record["request"]["url"] == "https://localhost/secure"
        assert closes[0].outcome == "intercepted" and closes[0].context.sni == "localhost"

    run(main())


def test_no_sni_gets_a_leaf_for_the_destination_ip(
    ca: CertificateAuthority, pki: UpstreamPki
) -> None:
    async def main() -> None:
        upstream = await Upstream().start(pki.server_context())
        recorder = Recorder()
        async with proxied(
            ca, (LOCALHOST, upstream.port), recorder, upstream_ca=pki.ca_file
        ) as proxy:
            ctx = trusting(ca.cert_pem)
            ctx.check_hostname = False  # no server_hostname: no SNI sent
            reader, writer = await asyncio.open_connection(
                LOCALHOST, transparent_port(proxy), ssl=ctx
            )
            cert = writer.get_extra_info("peercert")
            assert ("IP Address", LOCALHOST) in cert["subjectAltName"]
            writer.write(b"GET /ip HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader)).status == 200
            writer.close()
            closes = await recorder.wait_closes(1)
        await upstream.close()
        assert closes[0].context.sni is None and closes[0].outcome == "intercepted"

    run(main())


def test_a_client_slow_to_send_its_client_hello(ca: CertificateAuthority, pki: UpstreamPki) -> None:
    """The early upstream connection is up (and watched) before the ClientHello comes: it
    is handed over to the TLS connection cleanly, and only one is made."""

    async def main() -> None:
        upstream = await Upstream().start(pki.server_context())
        recorder = Recorder()
        async with proxied(
            ca, (LOCALHOST, upstream.port), recorder, upstream_ca=pki.ca_file
        ) as proxy:
            raw_reader, raw_writer = await asyncio.open_connection(
                LOCALHOST, transparent_port(proxy)
            )
            await asyncio.sleep(0.3)  # the proxy's upstream connect finishes meanwhile
            await raw_writer.start_tls(trusting(ca.cert_pem), server_hostname="localhost")
            raw_writer.write(b"GET /late HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await read_response(raw_reader)).status == 200
            raw_writer.close()
            closes = await recorder.wait_closes(1)
        await upstream.close()
        assert closes[0].outcome == "intercepted", closes[0]
        assert len(upstream.received) == 1

    run(main())


async def _h2_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    try:
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.StreamEnded):
                    conn.send_headers(
                        event.stream_id, [(":status", "200"), ("content-type", "text/plain")]
                    )
                    conn.send_data(event.stream_id, b"h2 says hi", end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()
    finally:
        writer.close()


def test_alpn_h2_mirrored_and_recorded(ca: CertificateAuthority, pki: UpstreamPki) -> None:
    async def main() -> None:
        server = await asyncio.start_server(
            _h2_server, LOCALHOST, 0, ssl=pki.server_context(["h2", "http/1.1"])
        )
        port = server.sockets[0].getsockname()[1]
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, port), recorder, upstream_ca=pki.ca_file) as proxy:
            reader, writer = await asyncio.open_connection(
                LOCALHOST,
                transparent_port(proxy),
                ssl=trusting(ca.cert_pem, ["h2", "http/1.1"]),
                server_hostname="localhost",
            )
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection()
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(
                sid,
                [
                    (":method", "GET"),
                    (":path", "/h2path"),
                    (":scheme", "https"),
                    (":authority", "localhost"),
                ],
                end_stream=True,
            )
            writer.write(conn.data_to_send())
            status, body, ended = None, b"", False
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
            assert (status, body) == (b"200", b"h2 says hi")
            writer.close()
            closes = await recorder.wait_closes(1)
        server.close()
        ((tx, ctx),) = recorder.transactions
        assert ctx.alpn == "h2" and closes[0].context.l7_protocol == "http2"
        assert tx.request is not None and tx.request.target == "/h2path"
        assert tx.response is not None and tx.response.status == 200
        assert bytes(tx.response.body.data) == b"h2 says hi"

    run(main())


def test_untrusted_upstream_is_a_502(ca: CertificateAuthority, pki: UpstreamPki) -> None:
    async def main() -> None:
        upstream = await Upstream().start(pki.server_context())
        recorder = Recorder()
        # No upstream_ca_file: the test CA is not among the system roots.
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(
                LOCALHOST,
                transparent_port(proxy),
                ssl=trusting(ca.cert_pem),
                server_hostname="localhost",
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            resp = await read_response(reader)
            writer.close()
            closes = await recorder.wait_closes(1)
        await upstream.close()
        assert resp.status == 502
        assert "certificate" in (resp.header("x-flowtap-error") or "")
        assert closes[0].outcome == "upstream_failed"
        assert upstream.requests == []

    run(main())


def _handshake(port: int, context: ssl.SSLContext) -> None:
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        context.wrap_socket(sock, server_hostname="localhost").close()


def test_passthrough_after_the_client_rejects_our_certificate(
    ca: CertificateAuthority, pki: UpstreamPki
) -> None:
    async def main() -> None:
        upstream = await Upstream().start(pki.server_context())
        recorder = Recorder()
        async with proxied(
            ca, (LOCALHOST, upstream.port), recorder, upstream_ca=pki.ca_file
        ) as proxy:
            # This client trusts only the upstream's real CA (as if it pinned it).
            pinned = trusting(pki.ca_file)
            # A blocking client: OpenSSL sends its alert (unknown_ca) before it raises;
            # asyncio's TLS drops it and only hangs up.
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(_handshake, transparent_port(proxy), pinned)
            first = await recorder.wait_closes(1)
            assert first[0].outcome == "rejected" and first[0].context.sni == "localhost"
            # The client's certificate alert is evidence enough: for that client only.
            assert proxy.passthrough_destinations() == [
                (("pid", CLIENT_PID), LOCALHOST, upstream.port, "localhost")
            ]
            # From now on it passes through: the client sees the real certificate.
            reader, writer = await asyncio.open_connection(
                LOCALHOST, transparent_port(proxy), ssl=pinned, server_hostname="localhost"
            )
            assert _issuer_cn(writer) == "test upstream CA"
            writer.write(b"GET /pinned HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await read_response(reader)).json()["path"] == "/pinned"
            writer.close()
            closes = await recorder.wait_closes(2)
            counters = proxy.counters()
        await upstream.close()
        assert closes[1].outcome == "passthrough" and closes[1].context.sni == "localhost"
        assert closes[1].bytes_from_client > 0
        assert recorder.transactions == []  # nothing decrypted
        assert counters["rejected_by_client"] == 1 and counters["passthrough"] == 1
        assert counters["passthrough_learned_alert"] == 1
        assert counters["passthrough_learned_hangups"] == counters["passthrough_hangups"] == 0

    run(main())


def test_explicit_connect_with_tls(ca: CertificateAuthority, pki: UpstreamPki) -> None:
    async def main() -> None:
        upstream = await Upstream().start(pki.server_context())
        recorder = Recorder()
        async with proxied(ca, ("0.0.0.0", 1), recorder, upstream_ca=pki.ca_file) as proxy:
            assert proxy.explicit_address is not None
            reader, writer = await asyncio.open_connection(LOCALHOST, proxy.explicit_address[1])
            writer.write(
                f"CONNECT localhost:{upstream.port} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
            )
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await writer.start_tls(trusting(ca.cert_pem), server_hostname="localhost")
            writer.write(b"GET /connect-tls HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await read_response(reader)).json()["path"] == "/connect-tls"
            writer.close()
            closes = await recorder.wait_closes(1)
        await upstream.close()
        assert closes[0].outcome == "intercepted" and closes[0].context.mode == "explicit"
        assert closes[0].context.destination == ("localhost", upstream.port)
        ((tx, _),) = recorder.transactions
        assert tx.request is not None and tx.request.target == "/connect-tls"

    run(main())
