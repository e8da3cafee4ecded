"""What the endpoints cost the consumer: transactions/s through the sensor's userspace
(bench.consumer's records, no kernel) without the endpoints, then with their traffic
counter (a pipeline observer) and a scraper thread generating /metrics every --interval
seconds (Prometheus's default is 15 s: 0.1 s is a heavy case). Printed as a ratio; also
the time one scrape takes.

Run: .venv/bin/python -m bench.endpoints [--transactions N] [--interval SECONDS] [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time

from bench.consumer import records
from flowtap.config import SensorConfig
from flowtap.events import EventDecoder
from flowtap.httpd.health import Health
from flowtap.httpd.metrics import Metrics
from flowtap.httpd.traffic import TrafficCounter
from flowtap.loader.btf import Btf
from flowtap.loader.libbpf import BpfObject
from flowtap.loader.system import bpf_object_path
from flowtap.sensor import Sensor
from flowtap.sinks.jsonl import JsonLinesSink
from flowtap.sinks.pipeline import Pipeline


def _run(
    raw: list[bytes], btf: Btf, *, endpoints: bool, interval: float
) -> tuple[float, list[float]]:
    traffic = TrafficCounter()
    sink = JsonLinesSink(io.StringIO(), owned=False)
    config = SensorConfig(capture_level="summary")
    pipeline = Pipeline([("output", sink)])
    if endpoints:
        pipeline.observe(traffic.count)
    sensor = Sensor(config, pipeline)
    sensor._decoder = EventDecoder(btf)  # the decoder start() would set up
    scrapes: list[float] = []
    done = threading.Event()

    def scrape() -> None:
        metrics = Metrics(sensor, Health(sensor), traffic)
        while not done.wait(interval):
            began = time.perf_counter()
            metrics.response()
            scrapes.append(time.perf_counter() - began)

    scraper = threading.Thread(target=scrape, daemon=True)
    if endpoints:
        scraper.start()
    start = time.perf_counter()
    for record in raw:
        sensor._on_record(record)
    elapsed = time.perf_counter() - start
    done.set()
    if endpoints:
        scraper.join()
        got = traffic.snapshot().requests
        if sum(got.values()) != sensor.payloads.stats.transactions:
            raise SystemExit(f"endpoints: counted {got}, made {sensor.payloads.stats.transactions}")
    return elapsed, scrapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.endpoints", description=__doc__)
    parser.add_argument("--transactions", type=int, default=50_000)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    obj = BpfObject.open(bpf_object_path("conn.bpf.o"))
    try:
        btf = Btf(obj)
        raw = records(btf, args.transactions)
        # Alternated, best of --repeat each: this machine's other load is noise, not cost.
        bases: list[float] = []
        withs: list[float] = []
        scrapes: list[float] = []
        for _ in range(args.repeat):
            bases.append(_run(raw, btf, endpoints=False, interval=args.interval)[0])
            elapsed, taken = _run(raw, btf, endpoints=True, interval=args.interval)
            withs.append(elapsed)
            scrapes += taken
        base, with_endpoints = min(bases), min(withs)
    finally:
        obj.close()
    n = args.transactions
    print(f"without endpoints: {n / base:,.0f} transactions/s")
    print(
        f"with the traffic counter and a scrape every {args.interval} s: "
        f"{n / with_endpoints:,.0f} transactions/s ({len(scrapes)} scrapes, "
        f"{1e3 * sum(scrapes) / max(len(scrapes), 1):.2f} ms each)"
    )
    print(f"ratio of transactions/s with / without: {base / with_endpoints:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
