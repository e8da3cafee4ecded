"""The proxy's HTTP/1.1 head parsing with bytes alone: malformed and truncated input is
refused with the right error, never anything else."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtap.proxy.h1 import (
    HttpError,
    UpstreamError,
    parse_chunk_size,
    parse_request_head,
    parse_response_head,
)

CL_AND_TE = b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
GOOD = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"


def test_a_good_head() -> None:
    head = parse_request_head(GOOD, 100)
    assert (head.method, head.target, head.framing, head.content_length) == (
        "POST",
        "/a",
        "length",
        3,
    )
    assert head.keep_alive


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (CL_AND_TE, 400),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # space before the colon
        (b"GET /a HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET  /a HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"G\x00T /a HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ],
)
def test_refused_heads(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        parse_request_head(raw, 100)
    assert caught.value.status == status


def test_too_many_fields() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: 1\r\n" * 100 + b"\r\n"
    with pytest.raises(HttpError) as caught:
        parse_request_head(raw, 100)
    assert caught.value.status == 431


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_parsed_or_refused(garbage: bytes) -> None:
    for raw in (garbage + b"\r\n\r\n", GOOD[: len(garbage) % len(GOOD)] + garbage):
        with contextlib.suppress(HttpError):
            parse_request_head(raw, 100)
        with contextlib.suppress(UpstreamError):
            parse_response_head(raw, 100, "GET")
        with contextlib.suppress(ValueError):
            parse_chunk_size(garbage[:40] + b"\r\n")
