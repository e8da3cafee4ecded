"""The proxy serves at most max_connections at once, below the open-files limit (issue 15,
item 2): the excess is closed at accept, counted, and warned about once; the proxy goes
on serving."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
from dataclasses import replace

import pytest
from proxy_support import (
    LOCALHOST,
    Recorder,
    Upstream,
    eventually,
    exchange,
    proxied,
    run,
    transparent_port,
)

from flowtap.proxy import CertificateAuthority, ProxyConfig
from flowtap.proxy.server import FD_RESERVE
from flowtap.records.http import HttpRecordOptions

SCALE = float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))
CAP = 5
EXTRA = 3


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca") / "state")


def test_connections_over_the_cap_are_refused_counted_and_warned_once(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flowtap.proxy")

    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        config = replace(ProxyConfig(http=HttpRecordOptions(level="full")), max_connections=CAP)
        async with proxied(ca, (LOCALHOST, upstream.port), recorder, config) as proxy:
            port = transparent_port(proxy)
            # CAP clients that connect and say nothing yet: the proxy waits for them.
            held = [await asyncio.open_connection(LOCALHOST, port) for _ in range(CAP)]
            await eventually(lambda: proxy.counters()["open_connections"] == CAP, 5 * SCALE)
            refused = [await asyncio.open_connection(LOCALHOST, port) for _ in range(EXTRA)]
            for reader, _ in refused:
                async with asyncio.timeout(5 * SCALE):
                    assert await reader.read() == b""  # closed at once, nothing sent
            over = proxy.counters()
            # The held ones are still served.
            reader, writer = held[0]
            writer.write(b"GET /held HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert b'"path": "/held"' in await reader.read()
            for _, writer in held + refused:
                writer.close()
            await eventually(lambda: proxy.counters()["open_connections"] == 0, 5 * SCALE)
            # And a good client afterwards.
            good = await exchange(port, b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
            counters = proxy.counters()
        await upstream.close()
        assert over["refused_over_limit"] == EXTRA
        assert over["connections"] == CAP and over["max_connections"] == CAP
        assert good.status == 200 and good.json()["path"] == "/after"
        assert counters["refused_over_limit"] == EXTRA
        assert counters["connections"] == CAP + 1
        assert [r.path for r in upstream.requests] == ["/held", "/after"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            f"egress proxy at its limit of {CAP} connections: 1 refused so far; raise the "
            "open-files limit (LimitNOFILE= in the service, ulimit -n) to serve more "
            f"(the cap is (limit - {FD_RESERVE}) / 2)"
        ]

    run(main(), timeout=30 * SCALE)


# Holds HELD connections, then (on a line from stdin) opens EXTRA more and prints how many
# of those the proxy closed at once. A process of its own: its descriptors are not ours.
CLIENTS = """
import os, socket, sys
port, held_n, extra_n = map(int, sys.argv[1:])
wait = 10 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))
held = [socket.create_connection(("127.0.0.1", port), timeout=wait) for _ in range(held_n)]
print("held", flush=True)
sys.stdin.readline()
closed = 0
for _ in range(extra_n):
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    try:
        closed += s.recv(1) == b""
    except ConnectionResetError:
        closed += 1
    s.close()
print(closed, flush=True)
sys.stdin.readline()
"""


def test_default_cap_keeps_the_proxy_below_the_open_files_limit(
    ca: CertificateAuthority,
) -> None:
    """With a low open-files limit, far more clients than it allows: the proxy refuses
    the excess instead of running out of descriptors, and serves a client afterwards."""
    limit = FD_RESERVE + 2 * 40
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if len(os.listdir("/proc/self/fd")) > FD_RESERVE // 2:
        pytest.skip("this test process already holds too many descriptors")
    cap = (limit - FD_RESERVE) // 2
    extra = 400

    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            assert proxy.max_connections == cap
            port = transparent_port(proxy)
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENTS,
                str(port),
                str(cap),
                str(extra),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert child.stdin is not None and child.stdout is not None
            try:
                assert await child.stdout.readline() == b"held\n"
                await eventually(lambda: proxy.counters()["open_connections"] == cap, 5 * SCALE)
                child.stdin.write(b"go\n")
                closed = int(await child.stdout.readline())
                over = proxy.counters()
            finally:
                child.stdin.write(b"bye\n")
                await child.wait()  # its held connections close with it
            await eventually(lambda: proxy.counters()["open_connections"] == 0, 5 * SCALE)
            good = await exchange(port, b"GET /still HTTP/1.1\r\nHost: a\r\n\r\n")
        await upstream.close()
        assert closed == extra
        assert over["refused_over_limit"] == extra and over["accept_errors"] == 0
        assert good.status == 200

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        run(main(), timeout=60 * SCALE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
