"""Python clients and servers: IPv6, large transfers, every send path, many connections.
Byte counts must be exact on both ends."""

from __future__ import annotations

import pytest

from .helpers import Lab, Peer, Record, Server, find_pairs, only_pair

pytestmark = pytest.mark.e2e

MIB = 1 << 20


def check_exchange(
    records: list[Record],
    server: Server,
    client: Peer,
    *,
    sent: int,
    received: int,
    family: str = "ipv4",
    ip: str = "127.0.0.1",
) -> None:
    """Both records of both ends of one client/server exchange, exact."""
    connected = client.wait_message("connected")
    served = server.peer.wait_message("served")
    assert (served["received"], served["sent"]) == (sent, received)
    opened, closed = only_pair(records, pid=client.pid, direction="egress")
    for record in (opened, closed):
        assert record["process"]["pid"] == client.pid
        assert record["process"]["tid"] == connected["tid"]
        assert record["process"]["exe"] == client.exe
        assert record["process"]["cmdline"] == client.argv
        assert record["family"] == family
        assert record["local"] == {"ip": ip, "port": connected["local_port"]}
        assert record["remote"] == {"ip": ip, "port": server.port}
    assert opened["state"] == "established"
    assert (closed["bytes_sent"], closed["bytes_received"]) == (sent, received)
    assert closed["status"] == "closed"
    assert closed["error"] is None
    assert closed["l7_protocol"] == "other"

    s_open, s_close = only_pair(records, pid=server.pid, direction="ingress")
    for record in (s_open, s_close):
        assert record["process"]["tid"] == served["tid"]
        assert record["process"]["exe"] == server.peer.exe
        assert record["family"] == family
        assert record["local"] == {"ip": ip, "port": server.port}
        assert record["remote"] == {"ip": ip, "port": connected["local_port"]}
    assert (s_close["bytes_sent"], s_close["bytes_received"]) == (received, sent)
    assert s_close["status"] == "closed"
    assert s_close["l7_protocol"] == "other"


def exchange(
    e2e: Lab,
    *,
    host: str = "127.0.0.1",
    how: str = "sendall",
    send: int,
    reply: int,
    server_extra: tuple[str, ...] = (),
    client_extra: tuple[str, ...] = (),
) -> tuple[Server, Peer, list[Record]]:
    """One client/server exchange under a sensor on the test cgroup; all its records."""
    server = e2e.server(host=host, read=send, reply=reply, extra=server_extra)
    sensor = e2e.sensor()
    client = e2e.client(server, how=how, send=send, expect=reply, extra=client_extra)
    client.finish()
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    return server, client, sensor.finish()


@pytest.mark.kernels
def test_ipv6_loopback(e2e: Lab) -> None:
    server, client, records = exchange(e2e, host="::1", send=1000, reply=2000)
    check_exchange(records, server, client, sent=1000, received=2000, family="ipv6", ip="::1")


def test_ipv4_mapped_address_is_shown_as_ipv4(e2e: Lab) -> None:
    """An AF_INET6 socket connecting to ::ffff:127.0.0.1 is reported as IPv4."""
    server = e2e.server(read=10, reply=20)
    sensor = e2e.sensor()
    client = e2e.client(server, host="::ffff:127.0.0.1", send=10, expect=20)
    client.finish()
    connected = client.wait_message("connected")
    assert connected["local_ip"] == "::ffff:127.0.0.1"
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    _, closed = only_pair(sensor.finish(), pid=client.pid, direction="egress")
    assert closed["family"] == "ipv4"
    assert closed["local"] == {"ip": "127.0.0.1", "port": connected["local_port"]}
    assert closed["remote"] == {"ip": "127.0.0.1", "port": server.port}
    assert (closed["bytes_sent"], closed["bytes_received"]) == (10, 20)


@pytest.mark.parametrize(
    ("how", "send", "reply", "client_extra"),
    [
        ("sendall", 5 * MIB + 123, MIB + 7, ()),
        pytest.param("sendmsg", 3 * MIB + 5, 70_001, (), marks=pytest.mark.kernels),
        # From a second thread: the record's tid is that thread's.
        ("writev", 2 * MIB + 77, 65_537, ("--in-thread",)),
        pytest.param("sendfile", MIB + 3, 99, (), marks=pytest.mark.kernels),
    ],
)
def test_large_transfers_every_send_path(
    e2e: Lab, how: str, send: int, reply: int, client_extra: tuple[str, ...]
) -> None:
    server, client, records = exchange(
        e2e, how=how, send=send, reply=reply, client_extra=client_extra
    )
    check_exchange(records, server, client, sent=send, received=reply)
    if client_extra:
        assert client.wait_message("connected")["tid"] != client.pid


def test_accept_without_flags(e2e: Lab) -> None:
    """accept(2) rather than accept4(2) (which Python uses) registers the ingress end."""
    server, client, records = exchange(e2e, send=17, reply=19, server_extra=("--plain-accept",))
    check_exchange(records, server, client, sent=17, received=19)


def test_many_connections_in_a_row(e2e: Lab) -> None:
    """200 short connections from one process: 200 exact pairs each way, no drops."""
    count = 200
    server = e2e.server(read=50, reply=60, connections=count)
    sensor = e2e.sensor()
    client = e2e.client(server, send=50, expect=60, extra=["--repeat", str(count)])
    client.finish()
    server.peer.finish()
    sensor.wait_for(lambda records: len(records) >= 4 * count, what=f"{4 * count} records")
    records = sensor.finish()
    assert len(records) == 4 * count
    ports = sorted(m["local_port"] for m in client.messages("connected"))
    assert len(ports) == count
    egress = find_pairs(records, pid=client.pid, direction="egress")
    ingress = find_pairs(records, pid=server.pid, direction="ingress")
    assert sorted(o["local"]["port"] for o, _ in egress) == ports
    assert sorted(o["remote"]["port"] for o, _ in ingress) == ports
    for _, closed in egress:
        assert closed is not None
        assert (closed["bytes_sent"], closed["bytes_received"], closed["status"]) == (
            50,
            60,
            "closed",
        )
    for _, closed in ingress:
        assert closed is not None
        assert (closed["bytes_sent"], closed["bytes_received"], closed["status"]) == (
            60,
            50,
            "closed",
        )


@pytest.mark.parametrize(
    ("protocol", "sni"), [("tls", "flowtap.example"), ("http2", None), ("dns", None)]
)
def test_protocol_guessed_from_the_first_bytes(e2e: Lab, protocol: str, sni: str | None) -> None:
    """The client opens with a TLS ClientHello, an HTTP/2 preface or a DNS query (on an
    arbitrary port); both ends' close records name the protocol (and the SNI)."""
    server = e2e.server(read=1 << 20, reply=0)  # reads until the client closes
    sensor = e2e.sensor()
    client = e2e.client(server, extra=["--protocol", protocol])
    client.finish()
    sent = client.wait_message("exchanged")["sent"]
    served = server.peer.wait_message("served")
    assert served["received"] == sent
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    records = sensor.finish()
    _, closed = only_pair(records, pid=client.pid, direction="egress")
    _, s_close = only_pair(records, pid=server.pid, direction="ingress")
    assert (closed["bytes_sent"], closed["bytes_received"]) == (sent, 0)
    assert (s_close["bytes_sent"], s_close["bytes_received"]) == (0, sent)
    for record in (closed, s_close):
        assert record["l7_protocol"] == protocol
        assert record["sni"] == sni
