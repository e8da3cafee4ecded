"""Process attribution: exe, cmdline, uid and user of the process behind a connection."""

from __future__ import annotations

import os

import pytest

from .helpers import CURL, Lab, only_pair

pytestmark = pytest.mark.e2e

NOBODY = 65534


def test_process_started_before_the_sensor(e2e: Lab) -> None:
    """A client already running when the sensor starts is attributed from /proc."""
    server = e2e.server(read=300, reply=200)
    go = e2e.file("go")
    client = e2e.client(server, send=300, expect=200, go=go)
    assert client.exe is not None
    sensor = e2e.sensor()
    go.touch()
    connected = client.wait_message("connected")
    client.finish()
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    records = sensor.finish()
    _, closed = only_pair(records, pid=client.pid, direction="egress")
    process = closed["process"]
    assert process["exe"] == client.exe
    assert process["cmdline"] == client.argv
    assert process["comm"] == os.path.basename(client.argv[0])[:15]
    assert closed["local"]["port"] == connected["local_port"]
    assert (closed["bytes_sent"], closed["bytes_received"]) == (300, 200)


def test_unprivileged_client_is_attributed_to_its_user(e2e: Lab) -> None:
    """curl run as nobody (setpriv execs it in the same process): uid and user name."""
    server = e2e.server(mode="http", reply=1)
    sensor = e2e.sensor()
    url = f"http://127.0.0.1:{server.port}/"
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv = [CURL, "-sS", "--noproxy", "*", "--max-time", "10", "-o", "/dev/null", url]
    curl = e2e.spawn([*drop, *argv], cgroup=e2e.cgroup, stem="curl-nobody")
    curl.finish()
    sensor.wait_for_closed(pid=curl.pid, direction="egress")
    # Both ends recorded before the stop (the server's side closes after curl's).
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    records = sensor.finish()
    _, closed = only_pair(records, pid=curl.pid, direction="egress")
    process = closed["process"]
    assert process["uid"] == NOBODY
    assert process["user"] == "nobody"
    assert process["exe"] == CURL
    assert process["comm"] == "curl"
    assert process["cmdline"] == argv
    assert closed["status"] == "closed"


def test_long_command_line_is_complete(e2e: Lab) -> None:
    """A running client whose command line is longer than 512 bytes."""
    server = e2e.server(read=5, reply=5)
    sensor = e2e.sensor()
    hold = e2e.file("hold")
    client = e2e.client(server, send=5, expect=5, hold=hold, extra=["--tag", "t" * 700])
    client.wait_message("exchanged")
    sensor.wait_for(
        lambda records: any(r["process"]["pid"] == client.pid for r in records),
        what="the client's open record",
    )
    hold.touch()
    client.finish()
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    _, closed = only_pair(sensor.finish(), pid=client.pid, direction="egress")
    assert closed["process"]["cmdline"] == client.argv  # fails: cut after 512 bytes
