"""/metrics: a Prometheus collector that reads the sensor's own counters at scrape time.

Nothing is updated on the consumer's hot path for it, except the traffic counters the
sensor has no equivalent of (traffic.py). Every name is in docs/endpoints.md."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flowtap.httpd.health import Health
from flowtap.httpd.server import Response
from flowtap.httpd.traffic import TrafficCounter

if TYPE_CHECKING:
    from flowtap.sensor import Sensor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SensorCollector(Collector):
    def __init__(self, sensor: Sensor, health: Health, traffic: TrafficCounter) -> None:
        self._sensor = sensor
        self._health = health
        self._traffic = traffic

    def collect(self) -> Iterator[Metric]:
        sensor = self._sensor
        stats = sensor.tracker.stats
        yield _counter("flowtap_connections_opened", "connections seen opening", stats.opened)
        yield _counter("flowtap_connections_closed", "connections seen closing", stats.closed)
        yield _gauge("flowtap_connections_open", "connections open now", sensor.tracker.open_count)
        traffic = self._traffic.snapshot()
        yield _counter(
            "flowtap_bytes_sent",
            "bytes the traced programs sent, counted when their connections close",
            traffic.bytes_sent,
        )
        yield _counter(
            "flowtap_bytes_received",
            "bytes the traced programs received, counted when their connections close",
            traffic.bytes_received,
        )
        requests = CounterMetricFamily(
            "flowtap_http_requests",
            "HTTP transactions recorded, by method, status class and host (the first 100 "
            "hosts seen, the rest as other)",
            labels=("method", "status_class", "host"),
        )
        for labels, count in sorted(traffic.requests.items()):
            requests.add_metric(labels, count)
        yield requests
        yield _counter("flowtap_events", "events read from the kernel", sensor.counters.events)
        yield _counter("flowtap_records", "records written", sensor.counters.records)
        with self._health.lock:
            drops = sensor.drop_report()
        lost = CounterMetricFamily(
            "flowtap_drops",
            "what was lost, by cause (the names of the stats file's drops)",
            labels=("cause",),
        )
        for cause, count in sorted(drops.items()):
            lost.add_metric((cause,), count)
        yield lost
        yield from self._attach_state()
        reloads = CounterMetricFamily(
            "flowtap_config_reloads",
            "configuration reloads (SIGHUP, flowtap reload-config), by outcome",
            labels=("outcome",),
        )
        refused = sensor.config_reloads_refused
        if sensor.config_watcher is not None:
            refused += sensor.config_watcher.refused
        reloads.add_metric(("applied",), sensor.config_reloads)
        reloads.add_metric(("refused",), refused)
        yield reloads
        yield from self._sinks()

    def _sinks(self) -> Iterator[Metric]:
        """Each output of the pipeline: what waits in its queue, what it wrote, lost."""
        depth = GaugeMetricFamily(
            "flowtap_sink_queue_depth", "records waiting for each output", labels=("sink",)
        )
        written = CounterMetricFamily(
            "flowtap_sink_written", "records each output wrote", labels=("sink",)
        )
        dropped = CounterMetricFamily(
            "flowtap_sink_dropped",
            "records lost for each output (its queue was full, or the exit's flush ran out)",
            labels=("sink",),
        )
        for worker in self._sensor.pipeline.workers:
            depth.add_metric((worker.name,), worker.depth)
            written.add_metric((worker.name,), worker.stats.written)
            dropped.add_metric((worker.name,), worker.stats.dropped)
        yield depth
        yield written
        yield dropped

    def _attach_state(self) -> Iterator[Metric]:
        sensor = self._sensor
        yield _gauge(
            "flowtap_attached",
            "1 once the kernel programs are attached and the TLS probes of running programs "
            "were attempted",
            int(sensor.attached),
        )
        yield _gauge(
            "flowtap_kernel_programs_attached",
            "kernel programs attached (connections, payloads, process tracking)",
            sensor.programs_attached,
        )
        tls = sensor.tls
        yield _gauge(
            "flowtap_tls_available",
            "1 when TLS probes can be attached on this kernel and capture level",
            int(tls is not None),
        )
        outcomes = CounterMetricFamily(
            "flowtap_tls_attach",
            "TLS probe attachments, per program (library or executable) and outcome",
            labels=("outcome",),
        )
        if tls is not None:
            tls_stats = tls.stats
            outcomes.add_metric(("attached",), len(tls_stats.attached))
            outcomes.add_metric(("failed",), tls_stats.attach_failures)
            outcomes.add_metric(("deferred",), tls_stats.attach_deferred)
            outcomes.add_metric(("released",), tls_stats.files_released)
        yield outcomes
        if tls is not None:
            yield _counter(
                "flowtap_tls_files_examined",
                "files examined for TLS code",
                tls.stats.files_examined,
            )


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    """The registry of the sensor's collector alone (no process or platform collectors:
    the scrape says what flowtap saw, nothing else)."""

    def __init__(self, sensor: Sensor, health: Health, traffic: TrafficCounter) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SensorCollector(sensor, health, traffic))

    def response(self) -> Response:
        return Response(200, CONTENT_TYPE, generate_latest(self._registry))
