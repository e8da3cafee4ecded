"""docs/schema/connection.schema.json against what the record builders really emit."""

from __future__ import annotations

import copy
import errno
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from flowtap.events import Conn, ConnClose, ConnOpen, Endpoint, EventDecoder, Task
from flowtap.records.connection import (
    Record,
    WallClock,
    close_record,
    open_record,
    process_record,
)
from flowtap.tracking.connections import ConnectionTracker
from flowtap.tracking.processes import ProcessInfo, ProcessRegistry

Fields = dict[str, int | bytes]
PackEvent = Callable[[str, Fields], bytes]

DOCS = Path(__file__).resolve().parents[2] / "docs"
SCHEMA_PATH = DOCS / "schema" / "connection.schema.json"
CONTAINER = "ab" * 32
TS = "2023-11-14T22:13:20.123456Z"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> Any:
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def errors(validator: Any, record: Record) -> list[str]:
    return [e.message for e in validator.iter_errors(record)]


INFO = ProcessInfo(
    pid=4242,
    exe="/usr/bin/curl",
    comm="curl",
    cmdline=("curl", "https://example.com/"),
    uid=1000,
    user="alice",
    container_id=CONTAINER,
    ppid=1,
)
BARE = ProcessInfo(
    pid=31337, exe=None, comm="gone", cmdline=(), uid=0, user=None, container_id=None
)


def conn(
    *, ipv6: bool = False, direction: Any = "egress", local_port: int = 51234, conn_id: int = 7
) -> Conn:
    return Conn(
        conn_id=conn_id,
        start_ns=0,
        family="ipv6" if ipv6 else "ipv4",
        protocol="tcp",
        direction=direction,
        local=Endpoint("2001:db8::1" if ipv6 else "10.0.0.1", local_port),
        remote=Endpoint("2001:db8::2" if ipv6 else "93.184.216.34", 443),
    )


def make_open(c: Conn, info: ProcessInfo = INFO, *, state: str = "established") -> Record:
    error = "ECONNREFUSED" if state == "failed" else None
    return open_record(c, process_record(info, info.pid + 1), TS, state=state, error=error)


def make_close(opened: Record, c: Conn, **overrides: Any) -> Record:
    values: dict[str, Any] = {
        "bytes_sent": 517,
        "bytes_received": 4096,
        "duration_ns": 1_234_567,
        "status": "closed",
        "error": None,
        "l7_protocol": "tls",
        "sni": "example.com",
    }
    values.update(overrides)
    return close_record(opened, c, TS, **values)


def builder_records() -> dict[str, Record]:
    """Records from the real builders, covering every shape the schema must accept."""
    v4, v6 = conn(), conn(ipv6=True)
    failed_conn = conn(local_port=0)
    ingress = conn(direction="ingress", local_port=443)
    opened_v4 = make_open(v4)
    opened_v6 = make_open(v6, BARE)
    opened_failed = make_open(failed_conn, state="failed")
    return {
        "open": opened_v4,
        "open connecting": make_open(v4, state="connecting"),
        "open failed": opened_failed,
        "open ipv6": opened_v6,
        "open ingress": make_open(ingress),
        "close": make_close(opened_v4, v4),
        "close failed": make_close(
            opened_failed,
            failed_conn,
            bytes_sent=0,
            bytes_received=0,
            status="refused",
            error="ECONNREFUSED",
            l7_protocol=None,
            sni=None,
        ),
        "close ipv6": make_close(opened_v6, v6, l7_protocol="http2", sni=None),
        "close open_at_exit": make_close(
            opened_v4, v4, status="open_at_exit", l7_protocol=None, sni=None, error=None
        ),
        "close unknown errno": make_close(opened_v4, v4, status="failed", error="E4000"),
    }


@pytest.mark.parametrize("name", list(builder_records()))
def test_builder_records_validate(validator: Any, name: str) -> None:
    assert errors(validator, builder_records()[name]) == []


def test_schema_is_valid_draft_2020_12(schema: dict[str, Any]) -> None:
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_tracker_output_validates(
    validator: Any,
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    tmp_path: Path,
) -> None:
    """Bytes with the real layouts -> decoder -> tracker -> records that fit the schema."""
    records: list[Record] = []
    tracker = ConnectionTracker(ProcessRegistry(tmp_path), records.append, clock=WallClock())
    task: Fields = {"task.pid": 4242, "task.tid": 4242, "task.uid": 0, "task.comm": b"curl"}

    def conn_fields(conn_id: int, family: int, local: bytes, remote: bytes) -> Fields:
        return {
            "conn.conn_id": conn_id,
            "conn.family": family,
            "conn.protocol": socket.IPPROTO_TCP,
            "conn.direction": directions["FT_DIR_EGRESS"],
            "conn.local_port": 40000 + conn_id,
            "conn.remote_port": 443,
            "conn.local_addr": local,
            "conn.remote_addr": remote,
        }

    v4 = socket.inet_pton(socket.AF_INET, "10.0.0.1") + bytes(12)
    v4_remote = socket.inet_pton(socket.AF_INET, "192.0.2.1") + bytes(12)
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    v6_remote = socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1")
    mapped_remote = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1")
    one = conn_fields(1, socket.AF_INET, v4, v4_remote)
    two = conn_fields(2, socket.AF_INET6, v6, v6_remote)
    three = conn_fields(3, socket.AF_INET6, mapped, mapped_remote)
    four = conn_fields(4, socket.AF_INET, v4, v4_remote)
    stream = [
        pack_event("ft_conn_open_event", {**task, **one}),
        pack_event("ft_conn_close_event", {**task, **one, "bytes_sent": 1, "established": 1}),
        pack_event("ft_conn_close_event", {**task, **two, "sock_error": errno.ECONNREFUSED}),
        pack_event("ft_conn_open_event", {**task, **three}),
    ]
    for data in stream:
        event = decoder.decode(data)
        if isinstance(event, ConnOpen):
            tracker.on_open(event)
        elif isinstance(event, ConnClose):
            tracker.on_close(event)
    # Handshake still in progress when the sensor stops: read from the kernel's table.
    connecting = decoder.decode(pack_event("ft_conn_close_event", {**task, **four}))
    assert isinstance(connecting, ConnClose)
    tracker.close_remaining(
        [
            ConnClose(
                timestamp_ns=10**9,
                task=Task(4242, 4242, 0, "curl"),
                conn=Conn(
                    3,
                    0,
                    "ipv4",
                    "tcp",
                    "egress",
                    Endpoint("10.0.0.1", 40003),
                    Endpoint("192.0.2.1", 443),
                ),
                bytes_sent=0,
                bytes_received=0,
                sock_error=0,
                old_state=0,
                established=True,
                open_emitted=True,
            ),
            connecting,
        ]
    )

    assert [(r["event"], r["connection_id"]) for r in records] == [
        ("open", 1),
        ("close", 1),
        ("open", 2),
        ("close", 2),
        ("open", 3),
        ("close", 3),
        ("open", 4),
        ("close", 4),
    ]
    assert [r["state"] for r in records if r["event"] == "open"] == [
        "established",
        "failed",
        "established",
        "connecting",
    ]
    for record in records:
        assert errors(validator, record) == [], record


# --- drift: what the schema must reject ----------------------------------------------


@pytest.mark.parametrize("name", ["open", "close"])
def test_extra_top_level_field_fails(validator: Any, name: str) -> None:
    record = builder_records()[name]
    record["hostname"] = "web-1"

    assert any("hostname" in message for message in errors(validator, record))


@pytest.mark.parametrize(
    ("name", "path"),
    [("open", ("process",)), ("close", ("process",)), ("open", ("local",)), ("close", ("remote",))],
)
def test_extra_nested_field_fails(validator: Any, name: str, path: tuple[str, ...]) -> None:
    record = copy.deepcopy(builder_records()[name])
    record[path[0]]["extra"] = 1

    assert errors(validator, record)


def test_close_with_state_fails(validator: Any) -> None:
    record = builder_records()["close"]
    record["state"] = "established"

    assert errors(validator, record)


def test_open_with_close_fields_fails(validator: Any) -> None:
    record = builder_records()["open"]
    record["bytes_sent"] = 0

    assert errors(validator, record)


@pytest.mark.parametrize("name", ["open", "close"])
def test_every_field_is_required(validator: Any, name: str) -> None:
    complete = builder_records()[name]
    for field in complete:
        record = dict(complete)
        del record[field]
        assert errors(validator, record), f"{name} without {field} validated"
    for field in complete["process"]:
        record = copy.deepcopy(complete)
        del record["process"][field]
        assert errors(validator, record), f"{name} without process.{field} validated"


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("open", "type", "flow"),
        ("open", "event", "opened"),
        ("open", "state", "closed"),
        ("open", "family", "ipv5"),
        ("open", "direction", "both"),
        ("open", "socket_protocol", "sctp"),
        ("open", "error", "connection refused"),
        ("close", "status", "open"),
        ("close", "status", "established"),
        ("close", "l7_protocol", "ftp"),
        ("close", "direction", "outbound"),
        ("close", "event", "closed"),
    ],
)
def test_wrong_enum_fails(validator: Any, name: str, field: str, value: str) -> None:
    record = builder_records()[name]
    record[field] = value

    assert errors(validator, record)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timestamp", "2023-11-14T22:13:20.123456+00:00"),
        ("timestamp", "2023-11-14T22:13:20Z"),
        ("timestamp", "2023-11-14 22:13:20.123456Z"),
        ("connection_id", 0),
        ("connection_id", "7"),
        ("bytes_sent", -1),
        ("bytes_received", 1.5),
        ("duration_ms", -0.001),
        ("duration_ms", "1"),
        ("sni", ""),
        ("sni", "bad name"),
        ("local", {"ip": "10.0.0.1", "port": 65536}),
        ("remote", {"ip": "2001:db8::2", "port": 443}),  # ipv6 text in an ipv4 record
        ("remote", {"ip": "not an address", "port": 443}),
    ],
)
def test_wrong_value_fails(validator: Any, field: str, value: object) -> None:
    record = builder_records()["close"]
    record[field] = value

    assert errors(validator, record)


def test_wrong_process_values_fail(validator: Any) -> None:
    for field, value in [
        ("container_id", "abc"),
        ("container_id", CONTAINER.upper()),
        ("cmdline", "curl https://example.com/"),
        ("uid", -1),
        ("pid", 0),
    ]:
        record = copy.deepcopy(builder_records()["open"])
        record["process"][field] = value
        assert errors(validator, record), (field, value)


def test_missing_event_fails(validator: Any) -> None:
    record = builder_records()["open"]
    del record["event"]

    assert errors(validator, record)


def test_every_schema_field_is_documented(schema: dict[str, Any]) -> None:
    """docs/records.md names every field the schema knows, as `field`."""
    text = (DOCS / "records.md").read_text()
    names = set(schema["$defs"]["open"]["properties"]) | set(schema["$defs"]["close"]["properties"])
    names |= set(schema["$defs"]["process"]["properties"])
    documented = set(re.findall(r"`([a-z_0-9.]+)`", text))
    assert sorted(names - documented) == []
    assert {"open_at_exit", "connection_id", "l7_protocol"} <= documented


def test_examples_in_records_md_validate(validator: Any) -> None:
    text = (DOCS / "records.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]

    assert len(lines) >= 6
    for line in lines:
        record = json.loads(line)
        assert errors(validator, record) == [], line
