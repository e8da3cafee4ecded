"""Record builders, close status mapping, timestamps and the two output formats."""

from __future__ import annotations

import errno
import io
import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flowtap.events import Conn, Endpoint
from flowtap.records.connection import (
    Record,
    WallClock,
    close_record,
    close_status,
    errno_name,
    open_record,
)
from flowtap.sinks.console import ConsoleSink, endpoint, human_bytes
from flowtap.sinks.jsonl import JsonLinesSink

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
TS = "2023-11-14T22:13:20.123456Z"


def process(pid: int = 4242, comm: str = "curl") -> Record:
    return {
        "pid": pid,
        "tid": pid,
        "exe": f"/usr/bin/{comm}",
        "comm": comm,
        "cmdline": [comm],
        "uid": 0,
        "user": "root",
        "container_id": None,
    }


def conn(
    *,
    family: Any = "ipv4",
    direction: Any = "egress",
    local: tuple[str, int] = ("10.0.0.1", 51234),
    remote: tuple[str, int] = ("93.184.216.34", 443),
) -> Conn:
    return Conn(
        conn_id=7,
        start_ns=0,
        family=family,
        protocol="tcp",
        direction=direction,
        local=Endpoint(*local),
        remote=Endpoint(*remote),
    )


def opened(
    c: Conn | None = None, *, state: str = "established", error: str | None = None
) -> Record:
    return open_record(c or conn(), process(), TS, state=state, error=error)


def closed(
    c: Conn | None = None,
    *,
    sent: int = 0,
    received: int = 0,
    duration_ns: int = 1_000_000,
    status: str = "closed",
    error: str | None = None,
    l7: str | None = None,
    sni: str | None = None,
) -> Record:
    c = c or conn()
    return close_record(
        opened(c),
        c,
        TS,
        bytes_sent=sent,
        bytes_received=received,
        duration_ns=duration_ns,
        status=status,
        error=error,
        l7_protocol=l7,
        sni=sni,
    )


# --- status and errno names ---------------------------------------------------------


@pytest.mark.parametrize(
    ("sock_error", "established", "expected"),
    [
        (0, True, "closed"),
        (0, False, "failed"),  # closed before the handshake finished, no error
        (errno.ECONNREFUSED, False, "refused"),
        (errno.ETIMEDOUT, False, "timeout"),
        (errno.ETIMEDOUT, True, "timeout"),  # retransmissions gave up on an open connection
        (errno.ECONNRESET, True, "reset"),
        (errno.EPIPE, True, "reset"),
        (errno.EHOSTUNREACH, False, "failed"),
        (errno.ENETUNREACH, True, "failed"),
    ],
)
def test_close_status(sock_error: int, established: bool, expected: str) -> None:
    assert close_status(sock_error, established) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, None),
        (errno.ECONNREFUSED, "ECONNREFUSED"),
        (-errno.ECONNREFUSED, "ECONNREFUSED"),
        (-errno.EINPROGRESS, "EINPROGRESS"),
        (errno.ETIMEDOUT, "ETIMEDOUT"),
        (errno.ECONNRESET, "ECONNRESET"),
        (-errno.ENETUNREACH, "ENETUNREACH"),
        (4000, "E4000"),  # no name: still a stable string
        (-4000, "E4000"),
    ],
)
def test_errno_name(value: int, expected: str | None) -> None:
    assert errno_name(value) == expected


# --- record builders -----------------------------------------------------------------


def test_open_record_fields() -> None:
    record = opened(state="failed", error="ECONNREFUSED")

    assert record == {
        "type": "connection",
        "event": "open",
        "connection_id": 7,
        "timestamp": TS,
        "process": process(),
        "family": "ipv4",
        "socket_protocol": "tcp",
        "direction": "egress",
        "local": {"ip": "10.0.0.1", "port": 51234},
        "remote": {"ip": "93.184.216.34", "port": 443},
        "state": "failed",
        "error": "ECONNREFUSED",
    }


def test_close_record_drops_state_and_adds_the_outcome() -> None:
    first = opened(conn(local=("10.0.0.1", 0)))
    final = conn(local=("10.0.0.1", 40000))

    record = close_record(
        first,
        final,
        "2023-11-14T22:13:21.000000Z",
        bytes_sent=517,
        bytes_received=4096,
        duration_ns=1_234_567,
        status="closed",
        error=None,
        l7_protocol="tls",
        sni="example.com",
    )

    assert record == {
        "type": "connection",
        "event": "close",
        "connection_id": 7,
        "timestamp": "2023-11-14T22:13:21.000000Z",
        "process": process(),
        "family": "ipv4",
        "socket_protocol": "tcp",
        "direction": "egress",
        "local": {"ip": "10.0.0.1", "port": 40000},  # the port known at close wins
        "remote": {"ip": "93.184.216.34", "port": 443},
        "bytes_sent": 517,
        "bytes_received": 4096,
        "duration_ms": 1.235,
        "status": "closed",
        "error": None,
        "l7_protocol": "tls",
        "sni": "example.com",
    }
    assert first["state"] == "established"  # the open record is left as it was
    assert first["local"] == {"ip": "10.0.0.1", "port": 0}


# --- timestamps ----------------------------------------------------------------------


def test_rfc3339_exact(fixed_clock: WallClock) -> None:
    # fixed_clock: monotonic 0 is 1_700_000_000.123456789 seconds after the epoch.
    assert fixed_clock.rfc3339(0) == "2023-11-14T22:13:20.123456Z"
    assert fixed_clock.rfc3339(999) == "2023-11-14T22:13:20.123457Z"  # 123457788 ns
    assert fixed_clock.rfc3339(876_543_210) == "2023-11-14T22:13:20.999999Z"
    assert fixed_clock.rfc3339(876_543_211) == "2023-11-14T22:13:21.000000Z"
    assert fixed_clock.rfc3339(86_400 * 10**9) == "2023-11-15T22:13:20.123456Z"


def test_rfc3339_format_and_now() -> None:
    clock = WallClock()
    before = datetime.now(UTC)

    text = clock.rfc3339(time.monotonic_ns())

    assert RFC3339_UTC.match(text), text
    stamp = datetime.fromisoformat(text)
    assert stamp.utcoffset() == timedelta(0)
    assert abs(stamp - before) < timedelta(seconds=5)


# --- console lines -------------------------------------------------------------------


@pytest.fixture
def console() -> ConsoleSink:
    return ConsoleSink(io.StringIO(), color=False)


def test_console_open_established(console: ConsoleSink) -> None:
    assert console.format(opened()) == "open curl[4242] egress 10.0.0.1:51234 -> 93.184.216.34:443"


def test_console_open_connecting(console: ConsoleSink) -> None:
    line = console.format(opened(state="connecting"))
    assert line == "open curl[4242] egress 10.0.0.1:51234 -> 93.184.216.34:443 connecting"


def test_console_open_failed(console: ConsoleSink) -> None:
    record = opened(conn(local=("10.0.0.1", 0)), state="failed", error="ECONNREFUSED")
    assert (
        console.format(record)
        == "fail curl[4242] egress 10.0.0.1:0 -> 93.184.216.34:443 failed (ECONNREFUSED)"
    )


def test_console_open_ingress(console: ConsoleSink) -> None:
    c = conn(direction="ingress", local=("10.0.0.1", 443), remote=("198.51.100.9", 50000))
    record = open_record(c, process(80, "nginx"), TS, state="established", error=None)
    assert console.format(record) == "open nginx[80] ingress 10.0.0.1:443 <- 198.51.100.9:50000"


def test_console_open_ipv6(console: ConsoleSink) -> None:
    c = conn(family="ipv6", local=("2001:db8::1", 51234), remote=("2001:db8::2", 443))
    assert (
        console.format(opened(c))
        == "open curl[4242] egress [2001:db8::1]:51234 -> [2001:db8::2]:443"
    )


def test_console_close(console: ConsoleSink) -> None:
    record = closed(
        sent=1536, received=2 * 1024 * 1024, duration_ns=250_400_000, l7="tls", sni="example.com"
    )
    assert console.format(record) == (
        "close curl[4242] egress 10.0.0.1:51234 -> 93.184.216.34:443 tls sni=example.com "
        "sent 1.5 KiB recv 2.0 MiB 250 ms"
    )


def test_console_close_refused(console: ConsoleSink) -> None:
    record = closed(
        conn(local=("10.0.0.1", 38000)), status="refused", error="ECONNREFUSED", duration_ns=900_000
    )
    assert console.format(record) == (
        "close curl[4242] egress 10.0.0.1:38000 -> 93.184.216.34:443 "
        "sent 0 B recv 0 B 1 ms refused (ECONNREFUSED)"
    )


def test_console_close_ingress_ipv6_open_at_exit(console: ConsoleSink) -> None:
    c = conn(family="ipv6", direction="ingress", local=("::1", 8080), remote=("fe80::1", 61000))
    record = closed(c, sent=10, received=20, duration_ns=5_000_000_000, status="open_at_exit")
    assert console.format(record) == (
        "close curl[4242] ingress [::1]:8080 <- [fe80::1]:61000 "
        "sent 10 B recv 20 B 5000 ms open_at_exit"
    )


def test_console_colour_only_when_asked() -> None:
    plain = ConsoleSink(io.StringIO(), color=False).format(opened(state="failed", error="E1"))
    painted = ConsoleSink(io.StringIO(), color=True).format(opened(state="failed", error="E1"))

    assert "\033[" not in plain
    assert painted.startswith("\033[31mfail\033[0m \033[1mcurl[4242]\033[0m egress")


def test_console_write_is_one_line_per_record() -> None:
    stream = io.StringIO()
    sink = ConsoleSink(stream, color=False)

    sink.write(opened())
    sink.write(closed())
    sink.close()

    assert stream.getvalue().splitlines() == [
        "open curl[4242] egress 10.0.0.1:51234 -> 93.184.216.34:443",
        "close curl[4242] egress 10.0.0.1:51234 -> 93.184.216.34:443 sent 0 B recv 0 B 1 ms",
    ]
    assert not stream.closed  # not owned: flushed, left open


def test_console_other_records_are_printed_as_is(console: ConsoleSink) -> None:
    assert console.format({"type": "stats", "events": 3}) == "{'type': 'stats', 'events': 3}"


@pytest.mark.parametrize(
    ("ep", "text"),
    [
        ({"ip": "192.0.2.1", "port": 80}, "192.0.2.1:80"),
        ({"ip": "2001:db8::1", "port": 443}, "[2001:db8::1]:443"),
        ({"ip": "::", "port": 0}, "[::]:0"),
    ],
)
def test_endpoint(ep: dict[str, Any], text: str) -> None:
    assert endpoint(ep) == text


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2, "1.0 MiB"),
        (1024**3, "1.0 GiB"),
        (1024**4, "1.0 TiB"),
        (1023 * 1024**4, "1023.0 TiB"),
    ],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_human_bytes_pebibytes() -> None:
    assert human_bytes(1024**5) == "1.0 PiB"


# --- JSON lines ----------------------------------------------------------------------


def test_json_lines_one_compact_object_per_line() -> None:
    stream = io.StringIO()
    sink = JsonLinesSink(stream, owned=False)
    records = [opened(), closed(sent=5, l7="http1")]

    for record in records:
        sink.write(record)

    lines = stream.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert lines[0].startswith('{"type":"connection","event":"open","connection_id":7,')
    assert ": " not in lines[0]
    assert ", " not in lines[0]


def test_console_marks_what_went_through_the_egress_proxy(console: ConsoleSink) -> None:
    process = {"pid": 42, "tid": 42, "exe": "/usr/bin/curl", "comm": "curl", "cmdline": [],
               "uid": 0, "user": "root", "container_id": None}  # fmt: skip
    close: dict[str, Any] = {
        "type": "connection", "event": "close", "connection_id": 1 << 48, "process": process,
        "direction": "egress", "capture_source": "egress",
        "local": {"ip": "127.0.0.1", "port": 5555}, "remote": {"ip": "10.0.0.1", "port": 443},
        "l7_protocol": "tls", "sni": "api.example.com", "bytes_sent": 10, "bytes_received": 20,
        "duration_ms": 3.0, "status": "closed", "error": None,
        "egress": {"mode": "transparent", "outcome": "passthrough", "tls": True, "alpn": None,
                   "detail": None},
    }  # fmt: skip
    assert console.format(close) == (
        "close curl[42] egress 127.0.0.1:5555 -> 10.0.0.1:443 via proxy tls "
        "sni=api.example.com sent 10 B recv 20 B 3 ms passthrough"
    )
    close["egress"]["outcome"] = "intercepted"
    assert console.format(close).endswith("sent 10 B recv 20 B 3 ms")
