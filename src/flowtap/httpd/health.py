"""/healthz and /readyz from the sensor's state, read on the endpoints' threads."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from flowtap.httpd.server import Response

if TYPE_CHECKING:
    from flowtap.sensor import Sensor

# The consumer loop polls every 50 ms: this long without a turn means it is stuck.
LOOP_STALE_S = 5.0
# Ring-buffer drops within this window mean the consumer is not keeping up.
DROP_WINDOW_S = 10.0
# Kernel counters of events lost because the ring buffer was full (or kept for
# connections): what a consumer that keeps up never sees grow.
RING_DROPS = ("ringbuf_full", "payload_shed")
_SAMPLE_S = 0.5


class Health:
    def __init__(self, sensor: Sensor) -> None:
        self._sensor = sensor
        self.lock = threading.Lock()  # kernel counter reads (one reader at a time), the history
        self._history: deque[tuple[float, int]] = deque()

    def ring_drops(self) -> int:
        with self.lock:
            counters = self._sensor.kernel_counters()
        return sum(counters.get(name, 0) for name in RING_DROPS)

    def sample(self) -> int:
        """Records the ring-buffer drops now; returns their growth over the window."""
        drops = self.ring_drops()
        now = time.monotonic()
        with self.lock:
            # At most one kept a _SAMPLE_S: a client asking /readyz in a loop must not
            # grow the history.
            if not self._history or now - self._history[-1][0] >= _SAMPLE_S:
                self._history.append((now, drops))
            while len(self._history) > 1 and self._history[1][0] <= now - DROP_WINDOW_S:
                self._history.popleft()
            return drops - self._history[0][1]

    def _loop_age(self) -> float | None:
        at = self._sensor.loop_at
        return None if at is None else time.monotonic() - at

    def healthz(self) -> Response:
        age = self._loop_age()
        if age is None:
            return _json(503, False, "the consumer loop has not started: the sensor is attaching")
        if age > LOOP_STALE_S:
            return _json(503, False, f"the consumer loop has not run for {age:.1f} s")
        return _json(200, True, "alive; the consumer loop ran recently", loop_age_s=age)

    def readyz(self) -> Response:
        if not self._sensor.attached:
            return _json(
                503, False, "not attached yet: kernel programs and TLS probes are being set up"
            )
        age = self._loop_age()
        if age is None or age > LOOP_STALE_S:
            return _json(503, False, "the consumer loop is not running", loop_age_s=age)
        grown = self.sample()
        if grown:
            return _json(
                503,
                False,
                f"not keeping up: {grown} events lost to a full ring buffer in the last "
                f"{DROP_WINDOW_S:.0f} s",
                ring_drops_in_window=grown,
            )
        return _json(
            200, True, "attached, and the consumer keeps up", ring_drops_in_window=0, loop_age_s=age
        )


def _json(status: int, ok: bool, reason: str, **detail: object) -> Response:
    age = detail.get("loop_age_s")
    if isinstance(age, float):
        detail["loop_age_s"] = round(age, 3)
    body = json.dumps({"ok": ok, "reason": reason, **detail}, sort_keys=True) + "\n"
    return Response(status, "application/json", body.encode())
