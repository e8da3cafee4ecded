"""The endpoints' pure parts: --httpd-listen's values, and label cardinality."""

from __future__ import annotations

import socket

import pytest

from flowtap.httpd.endpoints import start_endpoints
from flowtap.httpd.health import Health
from flowtap.httpd.listen import parse_listen
from flowtap.httpd.traffic import OTHER, TrafficCounter
from flowtap.settings.options import BY_NAME, SettingError, parse_text


def test_listen_values() -> None:
    assert parse_listen("127.0.0.1:10001") == ("127.0.0.1", 10001)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen("off") is None
    assert parse_listen(" OFF ") is None
    for bad in ("10001", "localhost:10001", "127.0.0.1:0", "127.0.0.1:65536", ":80", "1.2.3.4:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_listen_setting_default_is_loopback() -> None:
    option = BY_NAME["httpd_listen"]
    assert option.default == "127.0.0.1:10001"
    assert option.flag == "--httpd-listen"
    assert parse_text(option, "off") == "off"
    assert parse_text(option, " Off") == "off"
    with pytest.raises(SettingError, match="not an IP address"):
        parse_text(option, "example.com:1")


def http(method: str, status: int | None, authority: str) -> dict[str, object]:
    response = {"status": status} if status is not None else None
    return {
        "type": "http",
        "request": {"method": method, "authority": authority},
        "response": response,
    }


def test_labels_are_bounded() -> None:
    counter = TrafficCounter(max_hosts=2)
    for host in ("a", "B", "c", "d"):
        counter.count(http("GET", 200, host))
    counter.count(http("b", 404, "a"))  # a lowercase "method" is not one
    counter.count(http("POST", None, "b"))
    counter.count({"type": "connection", "event": "close", "bytes_sent": 3, "bytes_received": 4})
    counter.count({"type": "connection", "event": "open"})
    snap = counter.snapshot()
    assert snap.requests == {
        ("GET", "2xx", "a"): 1,
        ("GET", "2xx", "b"): 1,
        ("GET", "2xx", OTHER): 2,
        (OTHER, "4xx", "a"): 1,
        ("POST", "none", "b"): 1,
    }
    assert (snap.bytes_sent, snap.bytes_received) == (3, 4)


def test_default_port_taken_runs_without_endpoints(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        # The default: a warning, and the sensor goes on.
        assert start_endpoints(None, TrafficCounter(), listen, {}) is None  # type: ignore[arg-type]
        assert "running without /healthz, /readyz and /metrics" in caplog.text
        # Asked for: an error that says what to do.
        with pytest.raises(OSError, match="choose another address with --httpd-listen"):
            start_endpoints(None, TrafficCounter(), listen, {"httpd_listen": "--httpd-listen"})  # type: ignore[arg-type]


class _Counters:
    """The one thing Health.sample reads of a sensor: its kernel counters."""

    def __init__(self) -> None:
        self.ringbuf_full = 0

    def kernel_counters(self) -> dict[str, int]:
        return {"ringbuf_full": self.ringbuf_full, "payload_shed": 0}


def test_readiness_history_is_bounded() -> None:
    counters = _Counters()
    health = Health(counters)  # type: ignore[arg-type]
    for _ in range(10_000):  # a client asking /readyz in a loop
        assert health.sample() == 0
    assert len(health._history) == 1
    counters.ringbuf_full = 7
    assert health.sample() == 7  # growth since the window's oldest sample
