from __future__ import annotations

import json

import pytest

from .helpers import Lab, find_pairs

pytestmark = pytest.mark.e2e


def test_long_argv(e2e: Lab) -> None:
    server = e2e.server(read=5, reply=5, extra=["--plain-accept"])
    sensor = e2e.sensor()
    client = e2e.client(server, send=5, expect=5, extra=["--tag", "t" * 700, "--in-thread"])
    client.finish()
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    sensor.stop()
    for r in sensor.records():
        print(json.dumps(r)[:300], "...", json.dumps(r["process"]["cmdline"])[-80:])
    print(client.wait_message("connected"))
    assert 0


def test_burst(e2e: Lab) -> None:
    n = 300
    server = e2e.server(read=50, reply=60, connections=n)
    sensor = e2e.sensor()
    client = e2e.client(server, send=50, expect=60, extra=["--repeat", str(n)])
    client.finish(60)
    server.peer.finish(60)
    sensor.wait_for(lambda rs: len(rs) >= 4 * n, what="all")
    stats = sensor.stop()
    rs = sensor.records()
    eg = find_pairs(rs, direction="egress")
    ing = find_pairs(rs, direction="ingress")
    print(len(eg), len(ing), stats)
    bad = [c for o, c in eg + ing if c is None or c["status"] != "closed" or {c["bytes_sent"], c["bytes_received"]} != {50, 60}]
    print(bad[:3])
    assert 0
