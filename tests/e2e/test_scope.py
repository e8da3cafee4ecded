"""What the sensor traces: --pid trees, --cgroup, --exe, --direction, loopback.

Negative checks stop the sensor first (it drains every pending event), so "not reported"
is final, not a race.
"""

from __future__ import annotations

import socket

import pytest

from .helpers import CURL, PEER, PYTHON, Lab, Sensor, only_pair, wait_until

pytestmark = pytest.mark.e2e


def start_all(*sensors: Sensor) -> None:
    for sensor in sensors:
        sensor.wait_ready()


def pids_in(sensor: Sensor) -> set[int]:
    return {record["process"]["pid"] for record in sensor.records()}


def test_pid_follows_the_process_tree(e2e: Lab) -> None:
    """--pid PARENT: a child it had already and a curl it forks later are both traced;
    a curl the test runs outside that tree at the same time is not. A second --pid (the
    raw server) is traced as well; the web server, in neither tree, is not."""
    web = e2e.server(mode="http", reply=77, connections=2)
    raw = e2e.server(read=10, reply=20)
    go = e2e.file("go")
    child_argv = [PYTHON, str(PEER), "client", "--port", str(raw.port)]
    child_argv += ["--send", "10", "--expect", "20", "--go", str(go)]
    url = f"http://127.0.0.1:{web.port}/"
    parent = e2e.spawn(
        [PYTHON, str(PEER), "parent", str(go), url, *child_argv], cgroup=e2e.cgroup, stem="parent"
    )
    child_pid = int(parent.wait_message("child")["child_pid"])

    sensor = e2e.sensor("--pid", str(parent.pid), "--pid", str(raw.pid))
    outsider = e2e.curl(url, cgroup=False)
    go.touch()
    outsider.finish()
    curl_pid = int(parent.wait_message("curl")["curl_pid"])
    parent.finish()
    assert parent.wait_message("done")["curl_rc"] == 0
    closed = sensor.wait_for_closed(pid=curl_pid, direction="egress")
    sensor.wait_for_closed(pid=child_pid, direction="egress")
    sensor.wait_for_closed(pid=raw.pid, direction="ingress")
    raw.peer.finish()
    web.peer.finish()
    records = sensor.finish()

    assert pids_in(sensor) == {curl_pid, child_pid, raw.pid}, records
    assert outsider.pid not in pids_in(sensor)
    assert len(records) == 6

    served = {m["peer_port"]: m for m in web.peer.messages("served")}
    process = closed["process"]
    assert process["exe"] == CURL
    assert process["comm"] == "curl"
    assert process["cmdline"][0] == CURL
    assert closed["remote"] == {"ip": "127.0.0.1", "port": web.port}
    mine = served[closed["local"]["port"]]
    assert (closed["bytes_sent"], closed["bytes_received"]) == (mine["received"], mine["sent"])
    assert closed["l7_protocol"] == "http1"

    child_connected = parent.wait_message("connected", pid=child_pid)
    _, child_close = only_pair(records, pid=child_pid)
    assert child_close["local"]["port"] == child_connected["local_port"]
    assert child_close["process"]["cmdline"] == child_argv
    assert (child_close["bytes_sent"], child_close["bytes_received"]) == (10, 20)


def test_exe_filter(e2e: Lab) -> None:
    """--cgroup CG --exe PATTERN: curl's connection is reported, a Python client's is not
    (nor the Python servers' accepted ends). PATTERN as a name, as a path glob, and
    repeated (any pattern may match)."""
    web = e2e.server(mode="http", reply=5)
    raw = e2e.server(read=1, reply=1)
    cg = ("--cgroup", str(e2e.cgroup.path))
    by_name = e2e.sensor(*cg, extra=["--exe", "curl"], wait=False)
    by_path = e2e.sensor(*cg, extra=["--exe", "/usr/bin/c*l"], wait=False)
    either = e2e.sensor(*cg, extra=["--exe", "no-such-program", "--exe", "cur?"], wait=False)
    start_all(by_name, by_path, either)
    python_client = e2e.client(raw, send=1, expect=1)
    python_client.finish()
    curl = e2e.curl(f"http://127.0.0.1:{web.port}/")
    curl.finish()
    raw.peer.finish()
    web.peer.finish()
    for sensor in (by_name, by_path, either):
        sensor.wait_for_closed(pid=curl.pid, direction="egress")
    for sensor in (by_name, by_path, either):
        records = sensor.finish()
        stats = sensor.stats
        assert stats is not None
        assert pids_in(sensor) == {curl.pid}, records
        assert len(records) == 2
        assert records[1]["process"]["exe"] == CURL
        assert stats["filtered_in_userspace"] == 3  # python client, two server ends


def test_cgroup_filter(e2e: Lab) -> None:
    """--cgroup CG: a client in a cgroup below CG is reported, one outside it is not."""
    server = e2e.server(read=3, reply=4, connections=2, cgroup=False)
    below = e2e.cgroup.child("below")
    sensor = e2e.sensor("--cgroup", str(e2e.cgroup.path))
    outside = e2e.client(server, send=3, expect=4, cgroup=False)
    outside.finish()
    inside = e2e.client(server, send=3, expect=4, cgroup=below)
    inside.finish()
    sensor.wait_for_closed(pid=inside.pid, direction="egress")
    server.peer.finish()
    records = sensor.finish()
    assert pids_in(sensor) == {inside.pid}, records
    assert len(records) == 2
    assert (records[1]["bytes_sent"], records[1]["bytes_received"]) == (3, 4)


def test_direction_loopback_and_combined_filters(e2e: Lab) -> None:
    """Four sensors on the same exchange: --direction egress sees only the client's end,
    --direction ingress only the server's, --cgroup AND --pid SERVER only the server's,
    and without --include-loopback nothing at all."""
    server = e2e.server(read=40, reply=30)
    cg = ("--cgroup", str(e2e.cgroup.path))
    egress = e2e.sensor(*cg, extra=["--direction", "egress"], wait=False)
    ingress = e2e.sensor(*cg, extra=["--direction", "ingress"], wait=False)
    server_only = e2e.sensor(*cg, "--pid", str(server.pid), wait=False)
    no_loopback = e2e.sensor(*cg, include_loopback=False, wait=False)
    start_all(egress, ingress, server_only, no_loopback)
    client = e2e.client(server, send=40, expect=30)
    client.finish()
    server.peer.finish()
    egress.wait_for_closed(pid=client.pid, direction="egress")
    ingress.wait_for_closed(pid=server.pid, direction="ingress")
    server_only.wait_for_closed(pid=server.pid, direction="ingress")
    for sensor in (egress, ingress, server_only, no_loopback):
        sensor.finish()

    assert [r["direction"] for r in egress.records()] == ["egress", "egress"]
    assert pids_in(egress) == {client.pid}
    assert egress.records()[1]["bytes_sent"] == 40
    for sensor in (ingress, server_only):
        assert [r["direction"] for r in sensor.records()] == ["ingress", "ingress"]
        assert pids_in(sensor) == {server.pid}
        assert sensor.records()[1]["bytes_received"] == 40
    assert no_loopback.records() == []


def test_pid_follows_children_forked_while_the_sensor_starts(e2e: Lab) -> None:
    """A --pid process that forks every 2 ms throughout the sensor's start-up: each child,
    existing before ready or forked after, is a descendant, and its connection (refused:
    nothing listens) must be reported."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
        port = closed.getsockname()[1]
        go = e2e.file("go")
        argv = [PYTHON, str(PEER), "forker", "--port", str(port), "--go", str(go)]
        forker = e2e.spawn([*argv, "--max", "600"], cgroup=e2e.cgroup, stem="forker")
        wait_until(lambda: forker.messages("forked"), 10, "the first fork")
        sensor = e2e.sensor("--pid", str(forker.pid))
        go.touch()
        forker.finish()
        records = sensor.finish()
    children = {m["child_pid"] for m in forker.messages("forked")}
    assert len(children) == forker.wait_message("done")["children"]
    reported = {r["process"]["pid"] for r in records if r["event"] == "close"}
    missing = sorted(children - reported)
    assert not missing, f"{len(missing)} of {len(children)} children not traced: {missing}"
    assert reported == children
