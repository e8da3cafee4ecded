"""HTTP transaction records: capture levels, redaction, URLs, gRPC, body caps."""

from __future__ import annotations

import base64

import pytest

from flowtap.protocols.messages import Body, Request, Response, Transaction
from flowtap.records.connection import WallClock
from flowtap.records.http import (
    REDACTED,
    CaptureLevel,
    ConnectionContext,
    HttpRecordOptions,
    http_record,
    is_secret,
    redact,
)

MS = 1_000_000
PROCESS = {"pid": 4242, "comm": "curl"}
EGRESS = ConnectionContext(7, PROCESS, "egress", tls=True, capture_source="openssl")


@pytest.fixture
def clock() -> WallClock:
    fixed = WallClock()
    fixed._offset_ns = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z at monotonic 0
    return fixed


def body(data: bytes, *, size: int | None = None, truncated: bool = False) -> Body:
    return Body(bytearray(data), len(data) if size is None else size, truncated)


def transaction(
    *,
    method: str = "POST",
    target: str = "/v1/items?page=2",
    version: str = "1.1",
    request_headers: list[tuple[str, str]] | None = None,
    request_body: Body | None = None,
    status: int = 201,
    response_headers: list[tuple[str, str]] | None = None,
    response_body: Body | None = None,
) -> Transaction:
    request = Request(
        method=method,
        target=target,
        version=version,
        headers=request_headers
        or [
            ("Host", "api.example.com"),
            ("User-Agent", "curl/7.88.1"),
            ("Authorization", "Bearer s3cr3t"),
            ("Content-Type", "application/json"),
        ],
        authority="api.example.com",
        body=request_body or body(b'{"name":"x"}'),
        start_ns=10 * MS,
        end_ns=11 * MS,
    )
    response = Response(
        status=status,
        reason="Created",
        version=version,
        headers=response_headers
        or [("Content-Type", "application/json"), ("Set-Cookie", "session=abc; Path=/")],
        body=response_body or body(b'{"id":1}'),
        start_ns=20 * MS,
        end_ns=22 * MS,
    )
    return Transaction(request, response)


def test_summary_level(clock: WallClock) -> None:
    record = http_record(transaction(), EGRESS, HttpRecordOptions(), clock)

    assert record == {
        "type": "http",
        "connection_id": 7,
        "timestamp": "2023-11-14T22:13:20.010000Z",
        "process": PROCESS,
        "direction": "egress",
        "capture_source": "openssl",
        "request": {
            "method": "POST",
            "scheme": "https",
            "authority": "api.example.com",
            "path": "/v1/items?page=2",
            "url": "https://api.example.com/v1/items?page=2",
            "protocol": "HTTP/1.1",
            "user_agent": "curl/7.88.1",
            "content_type": "application/json",
            "body_size": 12,
        },
        "response": {
            "status": 201,
            "reason": "Created",
            "content_type": "application/json",
            "body_size": 8,
        },
        "duration_ms": 12.0,
        "bytes_sent": 12,
        "bytes_received": 8,
        "stream_id": None,
        "error": None,
        "truncated": {"request_body": False, "response_body": False},
    }


def test_level_none_gives_no_record(clock: WallClock) -> None:
    assert http_record(transaction(), EGRESS, HttpRecordOptions(level="none"), clock) is None


def test_headers_level_redacts_credentials_by_default(clock: WallClock) -> None:
    record = http_record(transaction(), EGRESS, HttpRecordOptions(level="headers"), clock)

    assert record is not None
    assert record["request"]["headers"] == [
        ["Host", "api.example.com"],
        ["User-Agent", "curl/7.88.1"],
        ["Authorization", f"Bearer {REDACTED}"],
        ["Content-Type", "application/json"],
    ]
    assert record["response"]["headers"] == [
        ["Content-Type", "application/json"],
        ["Set-Cookie", REDACTED],
    ]
    assert "body" not in record["request"]


def test_redaction_opt_out_shows_values(clock: WallClock) -> None:
    options = HttpRecordOptions(level="headers", redact=False)
    record = http_record(transaction(), EGRESS, options, clock)

    assert record is not None
    assert ["Authorization", "Bearer s3cr3t"] in record["request"]["headers"]
    assert ["Set-Cookie", "session=abc; Path=/"] in record["response"]["headers"]


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("Authorization", True),
        ("proxy-authorization", True),
        ("Cookie", True),
        ("X-API-Key", True),
        ("x-goog-api-key", True),
        ("X-Auth-Token", True),
        ("X-Amz-Security-Token", True),
        ("X-CSRF-Token", True),
        ("x-client-secret", True),
        ("Content-Type", False),
        ("Accept", False),
        ("X-Request-Id", False),
    ],
)
def test_is_secret(name: str, secret: bool) -> None:
    assert is_secret(name) is secret


def test_redact_a_bare_token_entirely() -> None:
    assert redact([("Authorization", "s3cr3t"), ("Cookie", "a=b")]) == [
        ("Authorization", REDACTED),
        ("Cookie", REDACTED),
    ]


def test_full_level_bodies_base64_and_capped(clock: WallClock) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    tx = transaction(response_body=body(big))
    options = HttpRecordOptions(level="full", max_body_bytes=1000)

    record = http_record(tx, EGRESS, options, clock)

    assert record is not None
    assert base64.b64decode(record["request"]["body"]) == b'{"name":"x"}'
    assert record["request"]["body_truncated"] is False
    assert base64.b64decode(record["response"]["body"]) == big[:1000]
    assert record["response"]["body_truncated"] is True
    assert record["response"]["body_size"] == len(big)
    assert record["truncated"] == {"request_body": False, "response_body": True}


def test_full_level_body_already_cut_by_the_parser(clock: WallClock) -> None:
    tx = transaction(response_body=body(b"abc", size=10, truncated=True))
    record = http_record(tx, EGRESS, HttpRecordOptions(level="full"), clock)

    assert record is not None
    assert base64.b64decode(record["response"]["body"]) == b"abc"
    assert record["truncated"]["response_body"] is True


def test_ingress_swaps_sent_and_received(clock: WallClock) -> None:
    server = ConnectionContext(9, PROCESS, "ingress", tls=False, capture_source="plaintext")
    record = http_record(transaction(), server, HttpRecordOptions(), clock)

    assert record is not None
    assert (record["bytes_sent"], record["bytes_received"]) == (8, 12)
    assert record["request"]["url"] == "http://api.example.com/v1/items?page=2"


def test_absolute_form_target_of_a_proxy_request(clock: WallClock) -> None:
    tx = transaction(method="GET", target="http://example.org:8080/a/b?c=d")
    ctx = ConnectionContext(1, PROCESS, "egress", tls=False, capture_source="plaintext")
    record = http_record(tx, ctx, HttpRecordOptions(), clock)

    assert record is not None
    request = record["request"]
    assert (request["scheme"], request["authority"], request["path"]) == (
        "http",
        "example.org:8080",
        "/a/b?c=d",
    )
    assert request["url"] == "http://example.org:8080/a/b?c=d"


def test_grpc_service_method_and_status(clock: WallClock) -> None:
    tx = transaction(
        target="/helloworld.Greeter/SayHello",
        version="2",
        request_headers=[("content-type", "application/grpc"), ("te", "trailers")],
        status=200,
        response_headers=[
            ("content-type", "application/grpc"),
            ("grpc-status", "5"),
            ("grpc-message", "not found"),
        ],
    )
    tx.stream_id = 3
    record = http_record(tx, EGRESS, HttpRecordOptions(), clock)

    assert record is not None
    assert record["request"]["grpc"] == {"service": "helloworld.Greeter", "method": "SayHello"}
    assert record["request"]["protocol"] == "HTTP/2"
    assert record["response"]["grpc_status"] == 5
    assert record["stream_id"] == 3


def test_incomplete_transactions(clock: WallClock) -> None:
    tx = transaction()
    no_response = Transaction(tx.request, None, error="no response")
    no_request = Transaction(None, tx.response)

    first = http_record(no_response, EGRESS, HttpRecordOptions(), clock)
    second = http_record(no_request, EGRESS, HttpRecordOptions(), clock)

    assert first is not None and second is not None
    assert (first["response"], first["error"], first["duration_ms"]) == (None, "no response", 1.0)
    assert (second["request"], second["bytes_sent"], second["duration_ms"]) == (None, 0, 2.0)


@pytest.mark.parametrize("level", ["summary", "headers", "full"])
def test_informational_responses_listed(clock: WallClock, level: CaptureLevel) -> None:
    tx = transaction()
    assert tx.response is not None
    tx.response.informational = [100]
    record = http_record(tx, EGRESS, HttpRecordOptions(level=level), clock)

    assert record is not None
    assert record["response"]["informational"] == [100]
