"""Passthrough is decided per client, on evidence, for a while (issue 15, item 3): a client
that hangs up right after our ServerHello does not make the destination pass through for
another client, one hang-up is not evidence enough, and the decision expires."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from pathlib import Path

import pytest
from proxy_support import LOCALHOST, Recorder, Upstream, UpstreamPki, make_pki, read_response, run

from flowtap.proxy import CertificateAuthority, EgressProxy, ProxyConfig
from flowtap.records.http import HttpRecordOptions

SCALE = float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))
TTL_S = 2.0 * SCALE
HANGUPS = 3
OUR_CA = "flowtap local egress CA"
# Clients from their own loopback addresses; the injected attribution names their process.
PIDS = {"127.0.0.2": 1001, "127.0.0.3": 1002}  # 127.0.0.4 and .5: process unknown


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> UpstreamPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca") / "state")


def _proxy(
    ca: CertificateAuthority, pki: UpstreamPki, port: int, recorder: Recorder
) -> EgressProxy:
    config = ProxyConfig(
        http=HttpRecordOptions(level="full"),
        upstream_ca_file=str(pki.ca_file),
        passthrough_ttl=TTL_S,
        passthrough_hangups=HANGUPS,
    )
    return EgressProxy(
        config,
        ca,
        on_transaction=recorder.on_transaction,
        on_connection=recorder.on_connection,
        original_destination=lambda sock: (LOCALHOST, port),
        client_process=lambda peer: PIDS.get(peer[0]),
    )


def _port(proxy: EgressProxy) -> int:
    assert proxy.transparent_address is not None
    return proxy.transparent_address[1]


def _trusting(*cas: Path | bytes) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for item in cas:
        if isinstance(item, Path):
            context.load_verify_locations(cafile=str(item))
        else:
            context.load_verify_locations(cadata=item.decode())
    return context


async def _hang_up_after_server_hello(proxy: EgressProxy, source: str) -> None:
    """A real ClientHello, then a hang-up (FIN) as soon as the proxy's answer comes."""
    reader, writer = await asyncio.open_connection(LOCALHOST, _port(proxy), local_addr=(source, 0))
    tls = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    writer.write(outgoing.read())
    assert (await reader.read(1)) == b"\x16"  # the ServerHello's record
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _fetch(proxy: EgressProxy, source: str, context: ssl.SSLContext, path: str) -> str:
    """GET ``path``; the issuer of the certificate the client was shown."""
    reader, writer = await asyncio.open_connection(
        LOCALHOST,
        _port(proxy),
        ssl=context,
        server_hostname="localhost",
        local_addr=(source, 0),
    )
    cert = writer.get_extra_info("peercert")
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert (await read_response(reader)).json()["path"] == path
    writer.close()
    return str(dict(x[0] for x in cert["issuer"])["commonName"])


def _pinned_handshake(port: int, source: str, context: ssl.SSLContext) -> None:
    """A blocking client (OpenSSL sends its unknown_ca alert before raising)."""
    with socket.create_connection((LOCALHOST, port), timeout=10, source_address=(source, 0)) as s:
        context.wrap_socket(s, server_hostname="localhost").close()


def test_hang_ups_of_one_client_never_change_what_another_gets(
    ca: CertificateAuthority, pki: UpstreamPki
) -> None:
    async def main() -> None:
        upstream = await Upstream().start(pki.server_context())
        recorder = Recorder()
        ours = _trusting(ca.cert_pem)
        both = _trusting(ca.cert_pem, pki.ca_file)
        async with _proxy(ca, pki, upstream.port, recorder) as proxy:
            # One hang-up is not evidence: A itself is still intercepted.
            await _hang_up_after_server_hello(proxy, "127.0.0.2")
            await recorder.wait_closes(1, timeout=5 * SCALE)
            assert proxy.passthrough_destinations() == []
            assert await _fetch(proxy, "127.0.0.2", both, "/a1") == OUR_CA
            # Three within the TTL are: A's connections pass through...
            for _ in range(HANGUPS - 1):
                await _hang_up_after_server_hello(proxy, "127.0.0.2")
            await recorder.wait_closes(HANGUPS + 1, timeout=5 * SCALE)
            assert proxy.passthrough_destinations() == [
                (("pid", 1001), LOCALHOST, upstream.port, "localhost")
            ]
            assert await _fetch(proxy, "127.0.0.2", both, "/a2") == "test upstream CA"
            # ...and B's (another process, same destination and SNI) are intercepted.
            assert await _fetch(proxy, "127.0.0.3", ours, "/b1") == OUR_CA
            await recorder.wait_closes(HANGUPS + 3, timeout=5 * SCALE)
            middle = proxy.counters()
            # After the TTL, A is intercepted again.
            await asyncio.sleep(TTL_S)
            assert await _fetch(proxy, "127.0.0.2", both, "/a3") == OUR_CA
            await recorder.wait_closes(HANGUPS + 4, timeout=5 * SCALE)
            counters = proxy.counters()
        await upstream.close()
        assert middle["passthrough_destinations"] == 1
        assert middle["passthrough"] == 1 and middle["intercepted"] == 2
        assert counters["rejected_by_client"] == HANGUPS
        assert counters["passthrough_hangups"] == HANGUPS
        assert counters["passthrough_learned_hangups"] == 1
        assert counters["passthrough_learned_alert"] == 0
        assert counters["passthrough_expired"] == 1
        assert counters["passthrough_destinations"] == 0
        assert counters["passthrough"] == 1 and counters["intercepted"] == 3
        recorded = sorted(
            (ctx.pid, tx.request.target) for tx, ctx in recorder.transactions if tx.request
        )
        assert recorded == [(1001, "/a1"), (1001, "/a3"), (1002, "/b1")]

    run(main(), timeout=30 * SCALE)


def test_process_unknown_decided_per_client_address(
    ca: CertificateAuthority, pki: UpstreamPki
) -> None:
    async def main() -> None:
        upstream = await Upstream().start(pki.server_context())
        recorder = Recorder()
        pinned = _trusting(pki.ca_file)
        async with _proxy(ca, pki, upstream.port, recorder) as proxy:
            # A certificate alert is evidence at once, for that client only.
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(_pinned_handshake, _port(proxy), "127.0.0.4", pinned)
            await recorder.wait_closes(1, timeout=5 * SCALE)
            assert proxy.passthrough_destinations() == [
                (("address", "127.0.0.4"), LOCALHOST, upstream.port, "localhost")
            ]
            assert await _fetch(proxy, "127.0.0.4", pinned, "/c") == "test upstream CA"
            with pytest.raises(ssl.SSLCertVerificationError):
                await _fetch(proxy, "127.0.0.5", pinned, "/d")
            await recorder.wait_closes(3, timeout=5 * SCALE)
            counters = proxy.counters()
        await upstream.close()
        assert counters["passthrough_learned_alert"] == 1
        assert counters["passthrough"] == 1 and counters["rejected_by_client"] == 2
        assert counters["passthrough_destinations"] == 1

    run(main(), timeout=30 * SCALE)
