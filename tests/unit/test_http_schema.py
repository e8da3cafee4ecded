"""docs/schema/http.schema.json against the http records the builders really emit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from flowtap.protocols.messages import Body, Request, Response, Transaction
from flowtap.records.connection import Record, WallClock
from flowtap.records.http import ConnectionContext, HttpRecordOptions, http_record

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schema"
PROCESS = {
    "pid": 4242,
    "tid": 4242,
    "exe": "/usr/bin/curl",
    "comm": "curl",
    "cmdline": ["curl", "https://example.com/"],
    "uid": 0,
    "user": "root",
    "container_id": None,
}


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    documents = [json.loads(path.read_text()) for path in sorted(SCHEMAS.glob("*.json"))]
    registry: Registry[Any] = Registry().with_resources(
        (document["$id"], Resource.from_contents(document)) for document in documents
    )
    http = next(document for document in documents if document["$id"].endswith(":http"))
    Draft202012Validator.check_schema(http)
    return Draft202012Validator(http, registry=registry)


def record(level: str, tx: Transaction, *, tls: bool = True) -> Record:
    ctx = ConnectionContext(7, PROCESS, "egress", tls=tls, capture_source="openssl")
    built = http_record(tx, ctx, HttpRecordOptions(level=level), WallClock())  # type: ignore[arg-type]
    assert built is not None
    return built


def transaction() -> Transaction:
    request = Request(
        "POST",
        "/v1/items?x=1",
        "1.1",
        [("Host", "api.example.com"), ("Authorization", "Bearer abc")],
        authority="api.example.com",
        body=Body(bytearray(b"hi"), 2),
        start_ns=1_000,
        end_ns=2_000,
    )
    response = Response(
        201, "Created", "1.1", [("Content-Type", "text/plain")], Body(bytearray(b"ok"), 2)
    )
    return Transaction(request, response)


@pytest.mark.parametrize("level", ["summary", "headers", "full"])
def test_every_level_validates(validator: Draft202012Validator, level: str) -> None:
    errors = [e.message for e in validator.iter_errors(record(level, transaction()))]
    assert errors == []


def test_incomplete_transactions_validate(validator: Draft202012Validator) -> None:
    for tx in (
        Transaction(None, transaction().response, error="gap"),
        Transaction(transaction().request, None, error="no response"),
        Transaction(transaction().request, transaction().response, stream_id=3),
    ):
        assert [e.message for e in validator.iter_errors(record("full", tx))] == []


def test_a_summary_of_reset_streams_validates(validator: Draft202012Validator) -> None:
    tx = Transaction(transaction().request, None, stream_id=1, error="reset: CANCEL", count=500)
    built = record("summary", tx)
    assert built["streams"] == 500
    assert [e.message for e in validator.iter_errors(built)] == []
    assert "streams" not in record("summary", transaction())
    built["streams"] = 1  # a summary stands for more than one stream
    assert [e.message for e in validator.iter_errors(built)] != []


def test_unknown_field_and_bad_values_fail(validator: Draft202012Validator) -> None:
    good = record("headers", transaction())
    for path, value in (
        (("extra",), 1),
        (("capture_source",), "pcap"),
        (("request", "protocol"), "HTTP/3"),
        (("response", "status"), 42),
        (("request", "headers"), [["only-a-name"]]),
    ):
        bad = json.loads(json.dumps(good))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert list(validator.iter_errors(bad)), path
