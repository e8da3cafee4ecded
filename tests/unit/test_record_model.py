"""records/model.py: the typed records, their constructors and to_dict."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flowtap.events import Endpoint
from flowtap.records.model import (
    BodyCapture,
    ConnectionRecord,
    EgressDetail,
    Process,
    connection_close,
    connection_open,
    to_dict,
)

PROCESS = Process(5, 6, "/usr/bin/curl", "curl", ("curl", "http://x/"), 0, "root", None)


def _open(capture_source: str | None = None) -> ConnectionRecord:
    return connection_open(
        7,
        "T1",
        PROCESS,
        family="ipv4",
        socket_protocol="tcp",
        direction="egress",
        local=Endpoint("10.0.0.1", 0),
        remote=Endpoint("192.0.2.1", 443),
        state="established",
        error=None,
        capture_source=capture_source,
    )


def _close(opened: ConnectionRecord, egress: EgressDetail | None = None) -> ConnectionRecord:
    return connection_close(
        opened,
        "T2",
        local=Endpoint("10.0.0.1", 4000),
        remote=opened.remote,
        bytes_sent=1,
        bytes_received=2,
        duration_ns=1_234_567,
        status="closed",
        error=None,
        l7_protocol="http1",
        sni=None,
        egress=egress,
    )


def test_values_are_frozen_and_compare_by_value() -> None:
    opened = _open()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opened.state = "failed"  # type: ignore[misc]
    assert opened == _open()
    assert BodyCapture(True) == BodyCapture(True, None, False, None, None, None)
    assert dataclasses.replace(opened, state="failed").state == "failed"


def test_open_and_close_of_both_paths_serialize_in_their_field_order() -> None:
    kernel = _close(_open())
    egress = _close(_open("egress"), EgressDetail("transparent", "intercepted", True, None, None))
    assert kernel.event == "close" and _open().event == "open"
    assert list(to_dict(_open())) == [
        "type",
        "event",
        "connection_id",
        "timestamp",
        "process",
        "family",
        "socket_protocol",
        "direction",
        "local",
        "remote",
        "state",
        "error",
    ]
    kernel_keys = list(to_dict(kernel))
    egress_keys = list(to_dict(egress))
    assert kernel_keys.index("error") < kernel_keys.index("bytes_sent")
    assert egress_keys.index("error") > egress_keys.index("status")
    assert "state" not in kernel_keys and egress_keys[-1] == "egress"
    assert to_dict(kernel)["local"] == {"ip": "10.0.0.1", "port": 4000}
    assert to_dict(kernel)["duration_ms"] == 1.235


def test_the_process_is_serialized_once_and_shared() -> None:
    first, second = to_dict(_open()), to_dict(_close(_open()))
    assert first["process"] is second["process"]
    assert json.dumps(first["process"]) == json.dumps(
        {
            "pid": 5,
            "tid": 6,
            "exe": "/usr/bin/curl",
            "comm": "curl",
            "cmdline": ["curl", "http://x/"],
            "uid": 0,
            "user": "root",
            "container_id": None,
        }
    )


def test_a_serialized_record_passes_through() -> None:
    record = {"type": "connection", "event": "open"}
    assert to_dict(record) is record
