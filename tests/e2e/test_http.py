"""curl and HTTP/1.1 on 127.0.0.1: both ends of a connection, attributed and counted."""

from __future__ import annotations

import os

import pytest

from .helpers import CURL, Lab, only_pair

pytestmark = pytest.mark.e2e

BODY = 4321


@pytest.mark.kernels
def test_curl_get_both_ends(e2e: Lab) -> None:
    server = e2e.server(mode="http", reply=BODY)
    sensor = e2e.sensor()
    curl = e2e.curl(f"http://127.0.0.1:{server.port}/")
    curl.finish()
    served = server.peer.wait_message("served")
    sensor.wait_for_closed(pid=curl.pid, direction="egress")
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    records = sensor.finish()
    assert len(records) == 4, records

    # The client end: curl's own pid, exe and ports, exact byte counts.
    opened, closed = only_pair(records, pid=curl.pid, direction="egress")
    for record in (opened, closed):
        process = record["process"]
        assert process["pid"] == curl.pid
        assert process["tid"] == curl.pid
        assert process["exe"] == CURL
        assert process["comm"] == "curl"
        assert process["cmdline"] == curl.argv
        assert process["uid"] == 0
        assert process["user"] == "root"
        assert process["container_id"] is None
        assert record["type"] == "connection"
        assert record["family"] == "ipv4"
        assert record["socket_protocol"] == "tcp"
        assert record["local"] == {"ip": "127.0.0.1", "port": served["peer_port"]}
        assert record["remote"] == {"ip": "127.0.0.1", "port": server.port}
        assert record["error"] is None
    assert opened["state"] == "established"
    assert closed["status"] == "closed"
    assert closed["bytes_sent"] == served["received"]
    assert closed["bytes_received"] == served["sent"]
    assert served["sent"] > BODY
    assert closed["l7_protocol"] == "http1"
    assert closed["sni"] is None
    assert closed["duration_ms"] >= 0

    # The server end: the accepting thread of the Python server, counts mirrored.
    s_open, s_close = only_pair(records, pid=server.pid, direction="ingress")
    for record in (s_open, s_close):
        process = record["process"]
        assert process["pid"] == server.pid
        assert process["tid"] == served["tid"]
        assert process["exe"] == server.peer.exe
        assert process["cmdline"] == server.peer.argv
        assert record["family"] == "ipv4"
        assert record["local"] == {"ip": "127.0.0.1", "port": server.port}
        assert record["remote"] == {"ip": "127.0.0.1", "port": served["peer_port"]}
        assert record["error"] is None
    assert served["tid"] != server.pid  # it accepts in a worker thread
    assert s_open["state"] == "established"
    assert s_close["status"] == "closed"
    assert s_close["bytes_sent"] == served["sent"]
    assert s_close["bytes_received"] == served["received"]
    assert s_close["l7_protocol"] == "http1"
    assert s_open["connection_id"] != opened["connection_id"]


def test_short_lived_curl_under_sh(e2e: Lab) -> None:
    """sh forks, the child execs curl, curl exits at once: still named curl, not sh."""
    server = e2e.server(mode="http", reply=10)
    sensor = e2e.sensor()
    command = f"curl -s http://127.0.0.1:{server.port}/ >/dev/null"
    sh = e2e.spawn(["/bin/sh", "-c", command], cgroup=e2e.cgroup, stem="sh")
    sh.finish()
    served = server.peer.wait_message("served")
    sensor.wait_for_closed(direction="egress", local_port=served["peer_port"])
    records = sensor.finish()
    _, closed = only_pair(records, direction="egress")
    process = closed["process"]
    assert process["pid"] != sh.pid
    assert process["exe"] in (CURL, os.path.realpath(CURL))
    assert process["comm"] == "curl"
    assert process["cmdline"] == ["curl", "-s", f"http://127.0.0.1:{server.port}/"]
    assert closed["local"]["port"] == served["peer_port"]
    assert closed["remote"]["port"] == server.port
    assert closed["bytes_sent"] == served["received"]
    assert closed["bytes_received"] == served["sent"]
    assert closed["status"] == "closed"
