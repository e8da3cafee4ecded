"""How connections end: refused, timed out, aborted, reset, closed after a non-blocking
connect; and what the close record says about each."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from .helpers import Lab, only_pair

pytestmark = pytest.mark.e2e


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound by the test but not listening: connects to it are refused,
    and nobody else can listen there while the test holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_refused_connect(e2e: Lab, closed_port: int) -> None:
    """A blocking connect answered by a RST: open failed/ECONNREFUSED, close refused."""
    sensor = e2e.sensor()
    client = e2e.client(port=closed_port, how="refused")
    client.finish()
    assert client.wait_message("connect_failed")["name"] == "ECONNREFUSED"
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    records = sensor.finish()
    assert len(records) == 2, records
    opened, closed = only_pair(records, pid=client.pid, direction="egress")
    assert opened["state"] == "failed"
    assert opened["error"] == "ECONNREFUSED"
    assert opened["remote"] == closed["remote"] == {"ip": "127.0.0.1", "port": closed_port}
    assert closed["status"] == "refused"
    assert closed["error"] == "ECONNREFUSED"
    assert (closed["bytes_sent"], closed["bytes_received"]) == (0, 0)
    assert closed["l7_protocol"] is None
    assert closed["process"]["exe"] == client.exe


def test_nonblocking_connect(e2e: Lab) -> None:
    """connect_ex() -> EINPROGRESS, then the handshake completes: connecting or established
    (loopback is fast), then an ordinary close with exact counts."""
    server = e2e.server(read=64, reply=32)
    sensor = e2e.sensor()
    client = e2e.client(server, how="nonblock", send=64, expect=32)
    client.finish()
    assert client.wait_message("connect_ex")["code"] == errno.EINPROGRESS
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    records = sensor.finish()
    opened, closed = only_pair(records, pid=client.pid, direction="egress")
    assert opened["state"] in ("connecting", "established")
    assert opened["error"] is None
    assert opened["local"]["port"] == client.wait_message("connected")["local_port"]
    assert closed["status"] == "closed"
    assert (closed["bytes_sent"], closed["bytes_received"]) == (64, 32)
    _, s_close = only_pair(records, pid=server.pid, direction="ingress")
    assert (s_close["bytes_sent"], s_close["bytes_received"]) == (32, 64)


def test_handshake_timeout_and_abort(e2e: Lab) -> None:
    """A listener whose accept queue is full drops SYNs. A blocking connect with one SYN
    retry times out (~3 s): failed/ETIMEDOUT, then timeout. A non-blocking connect closed
    while pending: failed, then failed. The queued connection closes normally; the one
    the server never accepted is reported as the listener's, open at exit."""
    server = e2e.server(mode="stall")
    sensor = e2e.sensor()
    hold = e2e.file("hold")
    filler = e2e.client(server, hold=hold)  # fills the accept queue, never accepted
    filler.wait_message("exchanged")
    filler_port = filler.wait_message("connected")["local_port"]
    abort = e2e.client(server, how="abort")
    abort.finish()
    assert abort.wait_message("connect_ex")["code"] == errno.EINPROGRESS
    timeout = e2e.client(server, how="timeout")
    timeout.finish()
    assert timeout.wait_message("connect_failed")["name"] == "ETIMEDOUT"
    sensor.wait_for_closed(pid=timeout.pid, direction="egress")
    hold.touch()
    filler.finish()
    sensor.wait_for_closed(pid=filler.pid, direction="egress")
    records = sensor.finish()

    opened, closed = only_pair(records, pid=timeout.pid)
    assert (opened["state"], opened["error"]) == ("failed", "ETIMEDOUT")
    assert (closed["status"], closed["error"]) == ("timeout", "ETIMEDOUT")
    assert closed["duration_ms"] >= 2900  # SYN, a retry after 1 s, give up 2 s later
    assert (closed["bytes_sent"], closed["bytes_received"]) == (0, 0)

    # Never established: its open record is built from the close, as for any failure.
    opened, closed = only_pair(records, pid=abort.pid)
    assert (opened["state"], opened["error"]) == ("failed", None)
    assert (closed["status"], closed["error"]) == ("failed", None)

    opened, closed = only_pair(records, pid=filler.pid)
    assert opened["state"] == "established"
    assert closed["status"] == "closed"
    # Queued but never accepted: attributed to the listening process, open at exit.
    opened, closed = only_pair(records, pid=server.pid, direction="ingress")
    assert opened["remote"]["port"] == closed["remote"]["port"] == filler_port
    assert closed["status"] == "open_at_exit"
    assert (closed["bytes_sent"], closed["bytes_received"]) == (0, 0)


def test_reset_by_peer(e2e: Lab) -> None:
    """The server aborts (SO_LINGER 0) after the client has read the whole reply."""
    rst = e2e.file("rst")
    server = e2e.server(read=10, reply=20, extra=["--reset-after", str(rst)])
    sensor = e2e.sensor()
    hold = e2e.file("hold")
    client = e2e.client(server, send=10, expect=20, hold=hold)
    assert client.wait_message("exchanged")["received"] == 20
    rst.touch()
    server.peer.finish()
    closed = sensor.wait_for_closed(pid=client.pid, direction="egress")
    hold.touch()
    client.finish()
    records = sensor.finish()
    assert (closed["status"], closed["error"]) == ("reset", "ECONNRESET")
    assert (closed["bytes_sent"], closed["bytes_received"]) == (10, 20)
    _, s_close = only_pair(records, pid=server.pid, direction="ingress")
    assert (s_close["bytes_sent"], s_close["bytes_received"]) == (20, 10)


@pytest.mark.parametrize("ending", ["fin", "rst"])
def test_reply_read_after_the_socket_closed(e2e: Lab, ending: str) -> None:
    """The client sends 100 bytes and shuts down its side (FIN); the server replies 5000
    bytes and closes (fin) or aborts (rst). Only then does the client read the reply: its
    socket is already in TCP_CLOSE (TIME_WAIT, or reset) with the reply still queued."""
    rst = e2e.file("rst")
    if ending == "rst":
        rst.touch()
    server = e2e.server(read=100, reply=5000, extra=["--reset-after", str(rst)] * (ending == "rst"))
    sensor = e2e.sensor()
    can_read = e2e.file("can-read")
    client = e2e.client(server, send=100, expect=5000, half_close=can_read)
    server.peer.finish()
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    # The server's end closed after the client's end reached TCP_CLOSE (see docstring).
    can_read.touch()
    client.finish()
    assert client.wait_message("exchanged")["received"] == 5000
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    records = sensor.finish()
    _, closed = only_pair(records, pid=client.pid, direction="egress")
    assert closed["bytes_sent"] == 100
    assert closed["bytes_received"] == 5000  # fails: 0
