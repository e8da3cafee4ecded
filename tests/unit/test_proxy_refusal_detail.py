"""A refused request is answered with what was wrong, never with its own bytes (issue 15,
item 10): a secret in the refused request shows neither in the answer (body and
X-Flowtap-Error) nor in the connection record's detail."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from proxy_support import (
    LOCALHOST,
    Recorder,
    Upstream,
    proxied,
    run,
    transparent_port,
)

from flowtap.proxy import CertificateAuthority
from flowtap.proxy.records import egress_connection_record, egress_http_record
from flowtap.records.connection import WallClock
from flowtap.records.http import HttpRecordOptions

SCALE = float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))
SECRET = b"s3cr3t-T0ken-4f9a"

# refused request -> (status, the exact detail)
CASES: dict[str, tuple[bytes, int, str]] = {
    "no-colon": (
        b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization Bearer " + SECRET + b"\r\n\r\n",
        400,
        "header line 2 without a colon",
    ),
    "name-not-token": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX(" + SECRET + b"): 1\r\n\r\n",
        400,
        "header line 2: the field name is not a token",
    ),
    "control-in-value": (
        b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + SECRET + b"\x01\r\n\r\n",
        400,
        "header line 2: control character in the value",
    ),
    "cl-and-te": (
        b"POST / HTTP/1.1\r\nHost: a\r\nCookie: sid=" + SECRET + b"\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "conflicting Content-Length and Transfer-Encoding",
    ),
    "bad-content-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + SECRET + b"\r\n\r\n",
        400,
        "Content-Length is not a decimal number",
    ),
    "bad-transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + SECRET + b"\r\n\r\n",
        400,
        "unsupported Transfer-Encoding: only a single 'chunked' is accepted, got 1 coding(s)"
        " without 'chunked'",
    ),
    "request-line-parts": (
        b"GET /?token=" + SECRET + b" HTTP/1.1 x\r\nHost: a\r\n\r\n",
        400,
        "malformed request line: 4 parts separated by single spaces, not 3",
    ),
    "version": (
        b"GET /?token=" + SECRET + b" HTTP/3.7\r\nHost: a\r\n\r\n",
        505,
        "unsupported HTTP version: only HTTP/1.0 and HTTP/1.1",
    ),
    "chunk-size": (
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + SECRET
        + b"\r\nxx\r\n0\r\n\r\n",
        400,
        "bad chunk size line: not hex digits, extensions and CRLF",
    ),
}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca") / "state")


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_says_what_was_wrong_without_echoing_the_request(
    ca: CertificateAuthority, case: str
) -> None:
    raw, status, detail = CASES[case]

    async def main() -> None:
        upstream = await Upstream().start()
        recorder = Recorder()
        async with proxied(ca, (LOCALHOST, upstream.port), recorder) as proxy:
            reader, writer = await asyncio.open_connection(LOCALHOST, transparent_port(proxy))
            writer.write(raw)
            await writer.drain()
            answer = await reader.read()  # the proxy closes after its answer
            writer.close()
            closes = await recorder.wait_closes(1, timeout=5 * SCALE)
        await upstream.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].startswith(f"HTTP/1.1 {status} ".encode())
        assert f"X-Flowtap-Error: {detail}".encode() in head.split(b"\r\n")
        assert body == f"flowtap egress proxy: {detail}\n".encode()
        assert closes[0].error == detail
        record = egress_connection_record(closes[0], {"pid": 7}, WallClock())
        assert record["egress"]["detail"] == detail
        records = [record] + [
            egress_http_record(tx, ctx, {"pid": 7}, HttpRecordOptions(level="full"), WallClock())
            for tx, ctx in recorder.transactions
        ]
        for text in (answer, json.dumps(records).encode()):
            assert SECRET not in text
            assert SECRET[:8] not in text  # nor a piece of it

    run(main(), timeout=30 * SCALE)
