"""Connections lost to a consumer that fell behind are counted as connections.

The sensor is stopped (SIGSTOP) with a ring buffer of one page: the kernel cannot report
what the test's clients do meanwhile. Every connection must then be either in the records
or in the counts of connections_lost, exactly, and the exit summary says how many.
"""

from __future__ import annotations

import os
import signal

import pytest

from .helpers import (
    PEER,
    PEER_TIMEOUT_S,
    PYTHON,
    TIMEOUT_SCALE,
    Lab,
    Record,
    connections,
    wait_until,
)

HELD = 100  # opened while the sensor is stopped, closed once it runs again
BRIEF = 50  # opened and closed while it is stopped


def _client_groups(records: list[Record], pids: set[int]) -> dict[int, list[Record]]:
    return {
        conn_id: group
        for conn_id, group in connections(records).items()
        if group[0]["process"]["pid"] in pids
    }


@pytest.mark.kernels
def test_connections_lost_under_overload_are_counted_exactly(
    e2e: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One page of ring buffer: a stopped consumer loses events after a few dozen.
    monkeypatch.setenv("FLOWTAP_RING_BUFFER_BYTES", str(os.sysconf("SC_PAGE_SIZE")))
    server = e2e.server(mode="close", connections=HELD + BRIEF, cgroup=False)
    sensor = e2e.sensor(extra=["--capture-level", "none"])
    go_brief, hold = e2e.file("go-brief"), e2e.file("hold")
    # It closes at a pace the running consumer keeps up with: those events get through.
    argv = [PYTHON, str(PEER), "holder", "--port", str(server.port), "--hold", str(hold)]
    argv += ["--connections", str(HELD), "--pause", str(0.005 * TIMEOUT_SCALE)]
    holder = e2e.spawn(
        argv,
        cgroup=e2e.cgroup,
        stem="holder",
    )
    brief = e2e.client(server, go=go_brief, extra=["--repeat", str(BRIEF)])
    os.kill(sensor.pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: len(holder.messages("connected")) >= HELD,
            PEER_TIMEOUT_S,
            f"{HELD} connections of the holder",
            describe=holder.stderr,
        )
        go_brief.touch()
        brief.finish()
    finally:
        os.kill(sensor.pid, signal.SIGCONT)
    hold.touch()
    holder.finish()
    server.peer.finish()
    stats = sensor.stop()

    lost = stats["connections_lost"]
    drops = stats["drops"]
    assert lost == {
        "without_open_event": drops["conn_open_lost"],
        "without_close_event": drops["conn_close_lost"],
        "without_any_record": drops["conn_unreported"],
    }
    groups = _client_groups(sensor.records(), {holder.pid, brief.pid})
    total = HELD + BRIEF
    # Every connection is in the records, or counted as one without any.
    assert len(groups) + lost["without_any_record"] == total, stats
    for conn_id, group in groups.items():
        assert [r["event"] for r in group] == ["open", "close"], (conn_id, group)
    # Opens: from their open event, or made at close from a close event that says its
    # open was lost; the rest lost both.
    assert (
        stats["connections_opened"] - stats["opens_synthesized"]
        == total - lost["without_open_event"]
    ), stats
    assert stats["opens_lost_made_at_close"] == (
        lost["without_open_event"] - lost["without_any_record"]
    ), stats
    # Closes: from their close event, or with status lost at exit after an open record.
    statuses = [group[1]["status"] for group in groups.values()]
    assert statuses.count("closed") == total - lost["without_close_event"], stats
    assert statuses.count("lost") == lost["without_close_event"] - lost["without_any_record"]
    assert set(statuses) <= {"closed", "lost"}, statuses
    # Both ways of losing happened: the held connections lost opens and got their closes,
    # the brief ones lost everything.
    assert stats["opens_lost_made_at_close"] > 0, stats
    assert lost["without_any_record"] > 0, stats
    log = sensor.stderr()
    assert f"{lost['without_any_record']} have no record at all" in log, log
    assert f"{lost['without_open_event']} lost their open event" in log, log
