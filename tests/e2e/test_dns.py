"""DNS over UDP: sockets that send to port 53 are reported as udp connections.

The resolver and its stub server run in a network namespace the test makes, so port 53
on its loopback is ours alone.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import PYTHON, Lab, only_pair

pytestmark = pytest.mark.e2e

DNS_PEER = Path(__file__).resolve().with_name("dns_peer.py")
QUERY_BYTES = 29  # header 12 + example.com 13 + type/class 4
ANSWER_BYTES = QUERY_BYTES + 16


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"flowtap-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_dns_queries_over_udp(e2e: Lab, netns: str) -> None:
    sensor = e2e.sensor()
    peer = e2e.spawn(
        ["ip", "netns", "exec", netns, PYTHON, str(DNS_PEER)], cgroup=e2e.cgroup, stem="dns"
    )
    unconnected = peer.wait_message("unconnected")
    connected = peer.wait_message("connected")
    nobody = peer.wait_message("nobody")
    assert peer.wait() == 0
    assert nobody["outcome"] == "refused"
    pid = int(unconnected["pid"])
    for port in (unconnected["port"], connected["port"], nobody["port"]):
        sensor.wait_for_closed(local_port=port)
    records = sensor.finish()
    assert {r["socket_protocol"] for r in records} == {"udp"}

    opened, closed = only_pair(records, local_ip="0.0.0.0", local_port=unconnected["port"])
    assert closed["process"]["pid"] == pid
    assert closed["direction"] == "egress"
    assert closed["remote"] == {"ip": "127.0.0.1", "port": 53}
    assert (closed["bytes_sent"], closed["bytes_received"]) == (QUERY_BYTES, ANSWER_BYTES)
    assert (closed["l7_protocol"], closed["status"]) == ("dns", "closed")
    assert opened["state"] == "established"

    # Left open by the program: its exit ends the flow.
    _, closed = only_pair(records, local_ip="127.0.0.1", local_port=connected["port"])
    assert closed["remote"] == {"ip": "127.0.0.1", "port": 53}
    assert (closed["bytes_sent"], closed["bytes_received"]) == (QUERY_BYTES, ANSWER_BYTES)
    assert closed["status"] == "closed"

    # ICMP port unreachable reaches the socket as ECONNREFUSED.
    _, closed = only_pair(records, local_ip="127.0.0.1", local_port=nobody["port"])
    assert closed["remote"] == {"ip": "127.0.0.2", "port": 53}
    assert (closed["bytes_sent"], closed["bytes_received"]) == (QUERY_BYTES, 0)
    assert (closed["status"], closed["error"]) == ("refused", "ECONNREFUSED")
