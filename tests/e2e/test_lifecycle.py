"""Stopping the sensor: open connections closed as open_at_exit, counters, no leftovers."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from .helpers import (
    Lab,
    Record,
    assert_no_drops,
    assert_well_formed,
    bpftool_programs,
    find_pairs,
    only_pair,
    wait_until,
)

pytestmark = pytest.mark.e2e


def test_sigint_closes_open_connections_and_reports_no_drops(e2e: Lab) -> None:
    server = e2e.server(read=111, reply=222)
    sensor = e2e.sensor()
    hold = e2e.file("hold")
    client = e2e.client(server, send=111, expect=222, hold=hold)
    connected = client.wait_message("connected")
    assert client.wait_message("exchanged")["received"] == 222
    replied = server.peer.wait_message("replied")

    def both_open(records: list[Record]) -> bool:
        return bool(find_pairs(records, pid=client.pid) and find_pairs(records, pid=server.pid))

    sensor.wait_for(both_open, what="open records for both ends")
    stats = sensor.stop()  # both ends are still open: the client holds its connection
    hold.touch()
    client.finish()
    server.peer.finish()

    records = sensor.records()
    assert_well_formed(records)
    assert_no_drops(stats)
    assert len(records) == 4, records
    c_open, c_close = only_pair(records, pid=client.pid, direction="egress")
    s_open, s_close = only_pair(records, pid=server.pid, direction="ingress")
    assert records.index(c_close) > records.index(c_open)
    assert records.index(s_close) > records.index(s_open)
    assert c_close["status"] == s_close["status"] == "open_at_exit"
    assert c_close["local"] == {"ip": "127.0.0.1", "port": connected["local_port"]}
    assert s_close["remote"] == {"ip": "127.0.0.1", "port": replied["peer_port"]}
    assert (c_close["bytes_sent"], c_close["bytes_received"]) == (111, 222)
    assert (s_close["bytes_sent"], s_close["bytes_received"]) == (222, 111)
    assert c_close["l7_protocol"] == s_close["l7_protocol"] == "other"

    assert stats["records"] == 4
    assert stats["connections_opened"] == stats["connections_closed"] == 2
    for path in (sensor.output, sensor.stats_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_sigterm_is_a_clean_stop(e2e: Lab) -> None:
    sensor = e2e.sensor()
    ours = sensor.bpf_prog_ids()
    assert ours
    os.kill(sensor.pid, signal.SIGTERM)
    assert sensor.popen.wait(20) == 0, sensor.stderr()
    assert sensor.stats_file.exists()
    # Detached and closed before exit: none of its programs is left.
    wait_until(
        lambda: not ours & {p["id"] for p in bpftool_programs()},
        10,
        "the sensor's programs to be unloaded",
        interval=0.1,
    )


def test_kill_9_leaves_no_programs(e2e: Lab) -> None:
    """After SIGKILL the kernel frees every program once the process's fds are gone."""

    def tcp_state_ids() -> set[int]:
        return {p["id"] for p in bpftool_programs() if p.get("name") == "on_tcp_state"}

    before = tcp_state_ids()
    sensor = e2e.sensor()
    ours = sensor.bpf_prog_ids()
    programs = {p["id"]: p.get("name") for p in bpftool_programs()}
    names = {programs[i] for i in ours if i in programs}
    assert {"on_tcp_state", "on_sock_send", "on_sock_recv"} <= names, names
    mine = {i for i in ours if programs.get(i) == "on_tcp_state"}
    assert len(mine) == 1
    assert mine <= tcp_state_ids() - before

    os.kill(sensor.pid, signal.SIGKILL)
    assert sensor.popen.wait(10) == -signal.SIGKILL
    # Other sensors may run on this shared machine: check ours by id, not only a count.
    wait_until(
        lambda: not ours & {p["id"] for p in bpftool_programs()},
        10,
        "the killed sensor's programs to be freed",
        interval=0.1,
    )
    assert not mine & tcp_state_ids()
