"""ConnectionTracker: kernel events in, paired open/close records out (fake /proc)."""

from __future__ import annotations

import dataclasses
import errno
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from flowtap.events import Conn, ConnClose, ConnOpen, Direction, Endpoint, Flow, Task
from flowtap.records.connection import Record, WallClock
from flowtap.sensor import connections_lost, describe_connections_lost, exe_matcher
from flowtap.tracking import connections
from flowtap.tracking.connections import ConnectionTracker
from flowtap.tracking.processes import ProcessRegistry

AddProcess = Callable[..., Path]

CONTAINER = "4f2a" * 16
PID = 4242
TASK = Task(pid=PID, tid=4243, uid=0, comm="curl")
MS = 1_000_000
TCP_ESTABLISHED = 1  # include/net/tcp_states.h
TCP_SYN_SENT = 2


def tls_client_hello(server_hostname: str) -> bytes:
    """The first flight of a real TLS client (this Python's OpenSSL), without a network."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def conn(conn_id: int = 1, *, start_ns: int = 10 * MS, local_port: int = 51234) -> Conn:
    return Conn(
        conn_id=conn_id,
        start_ns=start_ns,
        family="ipv4",
        protocol="tcp",
        direction="egress",
        local=Endpoint("10.0.0.1", local_port),
        remote=Endpoint("93.184.216.34", 443),
    )


def open_event(
    conn_id: int = 1,
    *,
    timestamp_ns: int = 11 * MS,
    task: Task = TASK,
) -> ConnOpen:
    return ConnOpen(timestamp_ns, task, conn(conn_id))


def close_event(
    conn_id: int = 1,
    *,
    timestamp_ns: int = 260 * MS,
    sent: int = 0,
    received: int = 0,
    sock_error: int = 0,
    established: bool = True,
    open_emitted: bool = True,
    open_lost: bool = False,
    local_port: int = 51234,
    task: Task = TASK,
    sniff: tuple[Flow, bytes] | None = None,
) -> ConnClose:
    return ConnClose(
        timestamp_ns=timestamp_ns,
        task=task,
        conn=conn(conn_id, local_port=local_port),
        bytes_sent=sent,
        bytes_received=received,
        sock_error=sock_error,
        old_state=TCP_ESTABLISHED if established else TCP_SYN_SENT,
        established=established,
        open_emitted=open_emitted,
        open_lost=open_lost,
        sniff_flow=sniff[0] if sniff else None,
        sniff=sniff[1][:512] if sniff else b"",  # cut to 512 bytes as the kernel does
    )


@pytest.fixture
def registry(proc_root: Path, add_process: AddProcess) -> ProcessRegistry:
    add_process(
        PID,
        comm="curl",
        cmdline=("curl", "-sS", "https://example.com/"),
        exe="/usr/bin/curl",
        cgroup=f"0::/system.slice/docker-{CONTAINER}.scope\n",
    )
    add_process(80, comm="nginx", exe="/usr/sbin/nginx", cmdline=("nginx: worker process",))
    return ProcessRegistry(proc_root)


@pytest.fixture
def records() -> list[Record]:
    return []


@pytest.fixture
def tracker(
    registry: ProcessRegistry, records: list[Record], fixed_clock: WallClock
) -> ConnectionTracker:
    return ConnectionTracker(registry, records.append, clock=fixed_clock)


def test_open_then_close(tracker: ConnectionTracker, records: list[Record]) -> None:
    tracker.on_open(open_event())
    assert tracker.open_count == 1
    tracker.on_close(close_event(sent=517, received=123_456_789))

    assert [r["event"] for r in records] == ["open", "close"]
    opened, closed = records
    assert opened["connection_id"] == closed["connection_id"] == 1
    assert opened["state"] == "established"
    assert opened["error"] is None
    assert opened["timestamp"] == "2023-11-14T22:13:20.133456Z"  # fixed clock + start_ns
    assert opened["process"] == {
        "pid": PID,
        "tid": 4243,
        "exe": "/usr/bin/curl",
        "comm": "curl",
        "cmdline": ["curl", "-sS", "https://example.com/"],
        "uid": 0,
        "user": "root",
        "container_id": CONTAINER,
    }
    assert closed["process"] == opened["process"]
    assert closed["bytes_sent"] == 517
    assert closed["bytes_received"] == 123_456_789
    assert closed["duration_ms"] == 250.0  # close at 260 ms, start at 10 ms
    assert closed["timestamp"] == "2023-11-14T22:13:20.383456Z"
    assert closed["status"] == "closed"
    assert closed["error"] is None
    assert closed["l7_protocol"] is None
    assert closed["sni"] is None
    assert "state" not in closed
    assert tracker.open_count == 0
    assert (tracker.stats.opened, tracker.stats.closed) == (1, 1)
    assert tracker.stats.opens_synthesized == 0


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_open_event_is_established(
    tracker: ConnectionTracker, records: list[Record], direction: Direction
) -> None:
    """The kernel sends an open only once the handshake is done (egress) or the acceptor
    touched the connection (ingress): a non-blocking connect is never 'connecting'."""
    event = open_event()
    tracker.on_open(
        dataclasses.replace(event, conn=dataclasses.replace(event.conn, direction=direction))
    )

    assert len(records) == 1
    assert records[0]["event"] == "open"
    assert records[0]["direction"] == direction
    assert records[0]["state"] == "established"
    assert records[0]["error"] is None
    assert tracker.open_count == 1


def test_open_then_timeout_keeps_the_open_record(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    """Established, then retransmissions gave up: the open record stays established."""
    tracker.on_open(open_event())
    tracker.on_close(close_event(sock_error=errno.ETIMEDOUT, established=True))

    assert records[0]["state"] == "established"
    assert records[0]["error"] is None
    assert records[1]["status"] == "timeout"
    assert records[1]["error"] == "ETIMEDOUT"
    assert tracker.stats.opens_synthesized == 0


@pytest.mark.parametrize(
    ("sock_error", "open_error", "status"),
    [
        (errno.ECONNREFUSED, "ECONNREFUSED", "refused"),
        (errno.ETIMEDOUT, "ETIMEDOUT", "timeout"),  # non-blocking connect that never answered
        (errno.EHOSTUNREACH, "EHOSTUNREACH", "failed"),
        (0, None, "failed"),  # closed during the handshake, no error
    ],
)
def test_failed_handshake_synthesizes_a_failed_open(
    tracker: ConnectionTracker,
    records: list[Record],
    sock_error: int,
    open_error: str | None,
    status: str,
) -> None:
    tracker.on_close(close_event(sock_error=sock_error, established=False, open_emitted=False))

    assert [r["event"] for r in records] == ["open", "close"]
    assert records[0]["state"] == "failed"
    assert records[0]["error"] == open_error
    assert records[1]["status"] == status
    assert records[1]["error"] == open_error
    assert tracker.stats.opens_synthesized == 1


def test_close_without_open_synthesizes_the_open(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    """A handshake that failed: the kernel sends an open only once established."""
    tracker.on_close(
        close_event(
            timestamp_ns=13 * MS,
            sock_error=errno.ECONNREFUSED,
            established=False,
            open_emitted=False,
            local_port=38000,
        )
    )

    assert [r["event"] for r in records] == ["open", "close"]
    opened, closed = records
    assert opened["connection_id"] == closed["connection_id"] == 1
    assert opened["state"] == "failed"
    assert opened["error"] == "ECONNREFUSED"
    assert opened["timestamp"] == "2023-11-14T22:13:20.133456Z"  # the connection's start
    assert opened["local"] == {"ip": "10.0.0.1", "port": 38000}
    assert opened["process"]["exe"] == "/usr/bin/curl"
    assert closed["status"] == "refused"
    assert closed["error"] == "ECONNREFUSED"
    assert closed["duration_ms"] == 3.0
    assert (closed["bytes_sent"], closed["bytes_received"]) == (0, 0)
    assert tracker.stats.opens_synthesized == 1
    assert (tracker.stats.opened, tracker.stats.closed) == (1, 1)
    assert tracker.open_count == 0


def test_close_of_an_established_connection_whose_open_was_lost(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    tracker.on_close(close_event(sent=10, received=20, open_lost=True))

    assert records[0]["state"] == "established"
    assert records[0]["error"] is None
    assert records[1]["status"] == "closed"
    assert tracker.stats.opens_synthesized == 1
    assert tracker.stats.opens_lost == 1


def test_late_open_after_close_is_ignored_and_counted(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    tracker.on_close(close_event(sock_error=errno.ECONNREFUSED, established=False))
    tracker.on_open(open_event())

    assert [r["event"] for r in records] == ["open", "close"]
    assert tracker.stats.late_events == 1
    assert tracker.open_count == 0


def test_second_open_and_second_close_are_late(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    tracker.on_open(open_event())
    tracker.on_open(open_event())
    tracker.on_close(close_event())
    tracker.on_close(close_event())

    assert [r["event"] for r in records] == ["open", "close"]
    assert tracker.stats.late_events == 2


def test_tls_client_hello_gives_protocol_and_sni(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    hello = tls_client_hello("api.example.com")
    tracker.on_open(open_event())
    tracker.on_close(close_event(sent=len(hello), received=5000, sniff=("tx", hello)))

    closed = records[-1]
    assert closed["l7_protocol"] == "tls"
    assert closed["sni"] == "api.example.com"


def test_http1_request_without_sni(tracker: ConnectionTracker, records: list[Record]) -> None:
    tracker.on_open(open_event())
    request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    tracker.on_close(close_event(sent=37, received=17, sniff=("tx", request)))

    assert records[-1]["l7_protocol"] == "http1"
    assert records[-1]["sni"] is None


def test_exe_filter_hides_both_records(
    registry: ProcessRegistry, records: list[Record], fixed_clock: WallClock
) -> None:
    tracker = ConnectionTracker(
        registry, records.append, accept_process=exe_matcher(("nginx",)), clock=fixed_clock
    )
    nginx = Task(pid=80, tid=80, uid=0, comm="nginx")

    tracker.on_open(open_event(1))  # curl: filtered
    tracker.on_close(close_event(1, sent=16, sniff=("tx", b"GET / HTTP/1.1\r\n")))
    tracker.on_close(close_event(2, open_emitted=False, established=False))  # curl again
    tracker.on_open(open_event(3, task=nginx))  # nginx: shown
    tracker.on_close(close_event(3, task=nginx))

    assert [(r["event"], r["connection_id"]) for r in records] == [("open", 3), ("close", 3)]
    assert records[0]["process"]["comm"] == "nginx"
    assert tracker.stats.filtered == 2
    assert (tracker.stats.opened, tracker.stats.closed) == (3, 3)
    assert tracker.stats.late_events == 0
    assert tracker.open_count == 0


def test_close_remaining_reports_open_at_exit(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    tracker.on_open(open_event(1))
    tracker.on_open(open_event(2))
    tracker.on_close(close_event(2, sent=1))

    tracker.close_remaining([close_event(1, timestamp_ns=1010 * MS, sent=100, received=200)])

    assert [(r["event"], r["connection_id"]) for r in records] == [
        ("open", 1),
        ("open", 2),
        ("close", 2),
        ("close", 1),
    ]
    last = records[-1]
    assert last["status"] == "open_at_exit"
    assert last["error"] is None
    assert (last["bytes_sent"], last["bytes_received"]) == (100, 200)
    assert last["duration_ms"] == 1000.0
    assert tracker.open_count == 0


def test_close_remaining_for_a_connect_still_in_progress(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    """Registered at SYN_SENT, handshake not done when the sensor stops: no open was sent."""
    tracker.close_remaining([close_event(5, established=False, open_emitted=False)])

    assert [(r["event"], r["connection_id"]) for r in records] == [("open", 5), ("close", 5)]
    assert records[0]["state"] == "connecting"
    assert records[0]["error"] is None
    assert records[1]["status"] == "open_at_exit"
    assert records[1]["error"] is None
    assert tracker.stats.opens_synthesized == 1
    assert tracker.open_count == 0


@pytest.mark.parametrize(("established", "state"), [(True, "established"), (False, "connecting")])
def test_close_remaining_state_of_a_synthesized_open(
    tracker: ConnectionTracker, records: list[Record], established: bool, state: str
) -> None:
    """At exit nothing has failed yet: established, or still connecting; never failed."""
    tracker.close_remaining([close_event(6, established=established, open_emitted=False)])

    assert records[0]["state"] == state
    assert records[0]["error"] is None
    assert records[1]["status"] == "open_at_exit"


def test_connecting_comes_only_from_close_remaining(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    """An ordinary close of a connection never established is failed, not connecting."""
    tracker.close_remaining([close_event(1, established=False, open_emitted=False)])
    tracker.on_close(close_event(2, established=False, open_emitted=False))

    assert [(r["connection_id"], r.get("state")) for r in records if r["event"] == "open"] == [
        (1, "connecting"),
        (2, "failed"),
    ]


def test_close_remaining_skips_connections_filtered_in_userspace(
    registry: ProcessRegistry, records: list[Record], fixed_clock: WallClock
) -> None:
    tracker = ConnectionTracker(
        registry, records.append, accept_process=exe_matcher(("nginx",)), clock=fixed_clock
    )
    tracker.on_open(open_event(1))

    tracker.close_remaining([close_event(1)])

    assert records == []
    assert tracker.open_count == 0


def test_close_remaining_when_the_open_event_was_lost(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    tracker.close_remaining([close_event(1, open_emitted=True)])

    assert [(r["event"], r["connection_id"]) for r in records] == [("open", 1), ("close", 1)]
    assert records[1]["status"] == "open_at_exit"


def test_eviction_never_duplicates_an_open_record(
    tracker: ConnectionTracker, records: list[Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "_MAX_OPEN", 2)
    for conn_id in (1, 2, 3):
        tracker.on_open(open_event(conn_id))
    assert tracker.stats.evicted == 1

    tracker.on_close(close_event(1))

    opens = [r["connection_id"] for r in records if r["event"] == "open"]
    assert sorted(opens) == [1, 2, 3]


def test_process_that_is_gone_falls_back_to_the_event(
    registry: ProcessRegistry, records: list[Record], fixed_clock: WallClock
) -> None:
    tracker = ConnectionTracker(registry, records.append, clock=fixed_clock)
    ghost = Task(pid=31337, tid=31338, uid=0, comm="short-lived")

    tracker.on_open(open_event(1, task=ghost))

    assert records[0]["process"] == {
        "pid": 31337,
        "tid": 31338,
        "exe": None,
        "comm": "short-lived",
        "cmdline": [],
        "uid": 0,
        "user": "root",
        "container_id": None,
    }


def test_close_lost_gives_every_open_record_a_close(
    tracker: ConnectionTracker, records: list[Record]
) -> None:
    """A close event dropped in the kernel (ring buffer full): at exit the connection
    still gets a close record, status lost, and is counted."""
    tracker.on_open(open_event(1))
    tracker.on_open(open_event(2))
    tracker.on_close(close_event(1, sent=5, received=7))

    assert tracker.close_lost(now_ns=900 * MS) == 1

    assert [(r["event"], r["connection_id"]) for r in records] == [
        ("open", 1),
        ("open", 2),
        ("close", 1),
        ("close", 2),
    ]
    lost = records[-1]
    assert (lost["status"], lost["bytes_sent"], lost["bytes_received"]) == ("lost", 0, 0)
    assert lost["error"] is None
    assert "state" not in lost
    assert tracker.open_count == 0
    assert tracker.stats.lost == 1
    assert tracker.close_lost(now_ns=901 * MS) == 0


def test_connections_lost_are_said_as_what_the_user_lost() -> None:
    lost = connections_lost({"conn_open_lost": 7, "conn_close_lost": 5, "conn_unreported": 3})

    assert lost == {"without_open_event": 7, "without_close_event": 5, "without_any_record": 3}
    words = describe_connections_lost(lost)
    assert words is not None
    assert "3 have no record at all" in words
    assert "7 lost their open event" in words
    assert "5 lost their close event" in words
    assert describe_connections_lost(connections_lost({"ringbuf_full": 9})) is None
