"""The endpoints of one sensor: which path answers what, and their start and stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from flowtap.httpd.health import Health
from flowtap.httpd.listen import parse_listen
from flowtap.httpd.metrics import Metrics
from flowtap.httpd.server import EndpointServer, Response
from flowtap.httpd.traffic import TrafficCounter

if TYPE_CHECKING:
    from flowtap.sensor import Sensor

log = logging.getLogger("flowtap")


class Endpoints:
    def __init__(self, sensor: Sensor, traffic: TrafficCounter, address: tuple[str, int]) -> None:
        self.health = Health(sensor)
        self.metrics = Metrics(sensor, self.health, traffic)
        self.server = EndpointServer(address, self._route, tick=self._tick)
        self._sensor = sensor
        # Held while an answer reads the sensor: stop() takes it, so no read is under
        # way when the sensor closes its kernel objects (libbpf frees their memory).
        self._reading = threading.Lock()
        self._stopped = False

    def _route(self, path: str) -> Response:
        with self._reading:
            if self._stopped:
                return Response(503, "text/plain; charset=utf-8", b"flowtap is stopping\n")
            return self._answer(path)

    def _answer(self, path: str) -> Response:
        if path == "/healthz":
            return self.health.healthz()
        if path == "/readyz":
            return self.health.readyz()
        if path == "/metrics":
            return self.metrics.response()
        body = b"not found: the endpoints are /healthz, /readyz and /metrics\n"
        return Response(404, "text/plain; charset=utf-8", body)

    def _tick(self) -> None:
        with self._reading:
            # The counters exist once the programs are loaded.
            if not self._stopped and self._sensor.attached:
                self.health.sample()

    def start(self) -> None:
        self.server.start()
        host, port = self.server.address
        shown = f"[{host}]" if ":" in host else host
        log.info("endpoints on http://%s:%d (/healthz, /readyz, /metrics)", shown, port)

    def stop(self) -> None:
        """Before the sensor stops: no request reads it from here on."""
        with self._reading:
            self._stopped = True
        self.server.stop()


def start_endpoints(
    sensor: Sensor, traffic: TrafficCounter, listen: str, origins: Mapping[str, str]
) -> Endpoints | None:
    """--httpd-listen, before the sensor attaches (so /readyz says it is not ready yet).
    The default port taken (another flowtap, another program) leaves the sensor running
    without endpoints; a port the user asked for that cannot be had is an error."""
    address = parse_listen(listen)
    if address is None:
        return None
    try:
        endpoints = Endpoints(sensor, traffic, address)
    except OSError as exc:
        message = (
            f"cannot serve the endpoints on {listen}: {exc.strerror or exc}; choose another "
            "address with --httpd-listen IP:PORT, or --httpd-listen off"
        )
        if "httpd_listen" in origins:
            raise OSError(message) from exc
        log.warning("%s (running without /healthz, /readyz and /metrics)", message)
        return None
    endpoints.start()
    return endpoints
