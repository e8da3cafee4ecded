"""HTTP/2 floods through the real sensor's egress proxy (issue 15, item 6): a client in
the redirected cgroup floods PING or opens and resets streams at once over intercepted
TLS; it gets GOAWAY ENHANCE_YOUR_CALM, the drop report counts it, the rapid reset is one
http record with its stream count, and curl on another connection gets its response."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import PYTHON
from .test_egress import HTTPS_PORT, NAME, Egress, _http, egress  # noqa: F401 (fixture)

FLOOD_CLIENT = Path(__file__).resolve().with_name("h2_flood_client.py")


@pytest.mark.parametrize("kind", ["ping", "rapid-reset"])
def test_h2_flood_gets_goaway_and_curl_its_answer(egress: Egress, kind: str) -> None:  # noqa: F811
    address = egress.host.address
    argv = [PYTHON, str(FLOOD_CLIENT), address, str(HTTPS_PORT), NAME, str(egress.trust)]
    flooder = egress.client([*argv, kind, "2000"], stem=f"flood-{kind}")
    done = flooder.wait_message("done")
    flooder.finish()
    assert done["goaway"] == 0xB, done  # ENHANCE_YOUR_CALM
    good = egress.curl("--http2", f"https://{NAME}:{HTTPS_PORT}/after/{kind}", stem="curl")
    good.finish()
    record = _http(egress.sensor, method="GET", path=f"/after/{kind}")
    assert record["response"]["status"] == 200
    stats = egress.sensor.stop()
    assert stats["drops"]["egress_h2_flood_closed"] == 1, stats["drops"]
    flooded = [
        r
        for r in egress.sensor.http_records()
        if r["capture_source"] == "egress" and r["process"]["pid"] == flooder.pid
    ]
    if kind == "ping":
        assert flooded == []
        return
    # One summary of the streams reset unanswered (the first, /reset) and at most the
    # stream whose HEADERS came just before the refused RST_STREAM.
    (summary,) = [r for r in flooded if "streams" in r]
    assert 200 <= summary["streams"] < 2000
    assert (summary["stream_id"], summary["error"]) == (1, "reset: CANCEL")
    assert summary["request"]["path"] == "/reset"
    assert len(flooded) <= 2, flooded
