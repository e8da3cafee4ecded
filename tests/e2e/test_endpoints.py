"""--httpd-listen: /readyz flips from 503 to 200 as the real sensor attaches, /metrics
counts what curl did (parsed with the Prometheus client's own parser), and bad clients
of the endpoints delay nobody else's scrape."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowtap.httpd.health import DROP_WINDOW_S, RING_DROPS
from flowtap.httpd.server import MAX_CONNECTIONS, MAX_REQUEST_BYTES, REQUEST_TIMEOUT_S

from .helpers import READY_TIMEOUT_S, RECORD_TIMEOUT_S, TIMEOUT_SCALE, Lab, wait_until

pytestmark = pytest.mark.e2e

BODY = 1234
# A client of the test's own: what a scrape may take, on a loaded machine.
CLIENT_TIMEOUT_S = 5.0 * TIMEOUT_SCALE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = CLIENT_TIMEOUT_S) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def raw_request(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)
    if data:
        sock.sendall(data)
    return sock


def read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def start_polled(e2e: Lab, port: int) -> tuple[Any, list[tuple[int, dict[str, Any]]]]:
    return start_polled_with(e2e, port, [])


def start_polled_with(
    e2e: Lab, port: int, extra: list[str]
) -> tuple[Any, list[tuple[int, dict[str, Any]]]]:
    """Starts the sensor and polls /readyz from that moment until it answers 200: the
    answers seen, in order (a refused connection is not an answer)."""
    sensor = e2e.sensor(extra=["--httpd-listen", f"127.0.0.1:{port}", *extra], wait=False)
    seen: list[tuple[int, dict[str, Any]]] = []

    def ready() -> bool:
        if sensor.popen.poll() is not None:
            raise AssertionError(f"flowtap exited:\n{sensor.stderr()}")
        try:
            status, body = get(f"http://127.0.0.1:{port}/readyz")
        except (urllib.error.URLError, ConnectionError):
            return False
        seen.append((status, json.loads(body)))
        return status == 200

    wait_until(ready, READY_TIMEOUT_S, "/readyz 200", interval=0.01, describe=sensor.stderr)
    return sensor, seen


def test_ready_after_attach_and_metrics_count_curl(e2e: Lab) -> None:
    port = free_port()
    server = e2e.server(mode="http", reply=BODY)
    sensor, seen = start_polled(e2e, port)

    # 503 while attaching, with the reason; then 200 once attached, never back.
    statuses = [status for status, _ in seen]
    assert statuses[0] == 503, seen
    assert statuses[-1] == 200, seen
    first_200 = statuses.index(200)
    assert set(statuses[:first_200]) == {503}, seen
    assert seen[0][1]["ok"] is False
    assert seen[0][1]["reason"].startswith("not attached yet"), seen[0]
    assert seen[-1][1] == {
        "ok": True,
        "reason": "attached, and the consumer keeps up",
        "ring_drops_in_window": 0,
        "loop_age_s": seen[-1][1]["loop_age_s"],
    }
    sensor.wait_ready()  # the ready file agrees

    # Traffic from a client started after the sensor: both ends are in the test cgroup.
    curl = e2e.curl(f"http://127.0.0.1:{server.port}/hello")
    curl.finish()
    served = server.peer.wait_message("served")
    sensor.wait_for_closed(pid=curl.pid, direction="egress")
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    host = f"127.0.0.1:{server.port}"

    def http_recorded() -> list[dict[str, Any]] | None:
        records = sensor.http_records()
        return records if len(records) == 2 else None

    http = wait_until(http_recorded, RECORD_TIMEOUT_S, "2 HTTP records", describe=sensor.describe)
    assert sorted(r["direction"] for r in http) == ["egress", "ingress"]

    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    metrics = samples(body.decode())
    assert metrics[("flowtap_connections_opened_total", ())] == 2
    assert metrics[("flowtap_connections_closed_total", ())] == 2
    assert metrics[("flowtap_connections_open", ())] == 0
    # Each end sent what the other received: the peer's own counts, both ways.
    assert metrics[("flowtap_bytes_sent_total", ())] == served["sent"] + served["received"]
    assert metrics[("flowtap_bytes_received_total", ())] == served["sent"] + served["received"]
    requests = {
        labels: value
        for (name, labels), value in metrics.items()
        if name == "flowtap_http_requests_total"
    }
    labels = (("host", host), ("method", "GET"), ("status_class", "2xx"))
    assert requests == {labels: 2}, requests
    assert metrics[("flowtap_drops_total", (("cause", "ringbuf_full"),))] == 0
    assert metrics[("flowtap_drops_total", (("cause", "decode_errors"),))] == 0
    assert metrics[("flowtap_attached", ())] == 1
    assert metrics[("flowtap_kernel_programs_attached", ())] > 0
    assert metrics[("flowtap_config_reloads_total", (("outcome", "applied"),))] == 0

    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200, body
    assert json.loads(body)["ok"] is True

    # The stats file's drops have the names /metrics uses.
    stats = sensor.stop()
    drop_causes = {
        dict(labels)["cause"] for (name, labels) in metrics if name == "flowtap_drops_total"
    }
    assert drop_causes == set(stats["drops"])
    # The pipeline's one output (--output-file): what it had written at the scrape, none lost.
    assert metrics[("flowtap_sink_dropped_total", (("sink", "file"),))] == 0
    assert 0 < metrics[("flowtap_sink_written_total", (("sink", "file"),))] <= stats["records"]
    assert ("flowtap_sink_queue_depth", (("sink", "file"),)) in metrics


def test_bad_clients_do_not_delay_a_scrape(e2e: Lab) -> None:
    port = free_port()
    sensor, _seen = start_polled(e2e, port)

    # A slowloris: a byte of request head a second, never the end of it.
    connected = time.monotonic()
    slow = raw_request(port, b"GET /metrics HTTP/1.1\r\n")
    began = time.monotonic()
    status, _body = get(f"http://127.0.0.1:{port}/metrics", timeout=REQUEST_TIMEOUT_S)
    assert status == 200
    assert time.monotonic() - began < REQUEST_TIMEOUT_S
    answer = b""
    for _ in range(int(REQUEST_TIMEOUT_S * 4)):
        time.sleep(0.5)
        slow.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            answer += slow.recv(4096)
        if answer:
            break
        slow.setblocking(True)
        slow.sendall(b"X")
    held = time.monotonic() - connected
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    # Cut off at the request timeout, although it kept sending.
    assert REQUEST_TIMEOUT_S <= held < REQUEST_TIMEOUT_S + CLIENT_TIMEOUT_S, held

    # A request head over the limit: 431, at once.
    huge = raw_request(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_BYTES + 10))
    assert read_all(huge, CLIENT_TIMEOUT_S).startswith(b"HTTP/1.1 431 ")
    huge.close()

    # As many idle connections as the endpoints serve at once: one more is refused with
    # 503 at once, and a scrape works again when they go.
    idle = [raw_request(port, b"") for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2 * TIMEOUT_SCALE)  # accepted, each on its thread
        over = raw_request(port, b"")
        refused = read_all(over, CLIENT_TIMEOUT_S)
        over.close()
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        assert b"too many connections" in refused
    finally:
        for sock in idle:
            sock.close()

    def scraped() -> bool:
        try:
            return get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    wait_until(scraped, CLIENT_TIMEOUT_S, "a scrape after the idle connections closed")
    assert sensor.popen.poll() is None
    sensor.stop()


def test_not_ready_while_the_ring_buffer_overflows(e2e: Lab) -> None:
    """A ring buffer of one page and a 4 MiB response captured in full: the kernel sheds
    payload it cannot fit, so /readyz says the consumer is not keeping up, until a whole
    window passes without a drop."""
    port = free_port()
    config = e2e.workdir / "small-ring.yaml"
    config.write_text("flowtap:\n  ring_buffer_bytes: 4096\n  capture_level: full\n")
    server = e2e.server(mode="http", reply=4 << 20)
    sensor, _seen = start_polled_with(e2e, port, ["--config", str(config)])
    curl = e2e.curl(f"http://127.0.0.1:{server.port}/big")
    curl.finish()
    server.peer.wait_message("served")

    def drops() -> float:
        _status, body = get(f"http://127.0.0.1:{port}/metrics")
        metrics = samples(body.decode())
        return sum(metrics[("flowtap_drops_total", (("cause", cause),))] for cause in RING_DROPS)

    assert drops() > 0  # what /readyz answers from: the kernel's own counters
    status, body = get(f"http://127.0.0.1:{port}/readyz")
    answer = json.loads(body)
    assert status == 503, answer
    assert answer["reason"].startswith("not keeping up"), answer
    assert answer["ring_drops_in_window"] > 0
    not_ready_at = time.monotonic()

    # Nothing more is lost: ready again once the window has passed.
    def ready() -> bool:
        return get(f"http://127.0.0.1:{port}/readyz")[0] == 200

    wait_until(ready, DROP_WINDOW_S + CLIENT_TIMEOUT_S, "/readyz 200 again", interval=0.1)
    assert time.monotonic() - not_ready_at < DROP_WINDOW_S + CLIENT_TIMEOUT_S
    assert sensor.popen.poll() is None
    sensor.stop()


def test_a_taken_port_given_is_an_error_and_off_serves_nothing(e2e: Lab) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        sensor = e2e.sensor(extra=["--httpd-listen", f"127.0.0.1:{port}"], wait=False)
        assert sensor.popen.wait(CLIENT_TIMEOUT_S) == 2
    assert (
        f"flowtap: cannot serve the endpoints on 127.0.0.1:{port}: Address already in use; "
        "choose another address with --httpd-listen IP:PORT, or --httpd-listen off"
    ) in sensor.stderr()

    sensor = e2e.sensor(extra=["--httpd-listen", "off"])
    assert "endpoints on" not in sensor.stderr()
    listening = {int(line.split()[1].split(":")[1], 16) for line in _tcp_listeners(sensor.pid)}
    assert not listening, listening
    sensor.stop()


def _tcp_listeners(pid: int) -> list[str]:
    """The listening TCP sockets (state 0A) among those the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    lines = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as stream:
            for line in stream.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    lines.append(line)
    return lines
