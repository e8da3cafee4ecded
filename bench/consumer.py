"""How many HTTP transactions the sensor's userspace turns into records per second, on one
core: ring-buffer records (built with the real layouts from conn.bpf.o's BTF) are fed to
the same decode -> reassembly -> HTTP/1 parsing -> record -> JSON path the sensor runs,
with no kernel involved. It shows what the consumer can take before the ring buffer fills.

Run: .venv/bin/python -m bench.consumer [--transactions N] [--level summary|headers|full]
     [--rules N]  (also with N capture rules that match nothing: the ratio is their cost)
     [--store]    (also with the SQLite store as a second sink: the ratio is its cost)
     [--otel]     (also with the otel sink sending to a loopback OTLP/gRPC receiver, and
                  with --store: with both sinks beside stdout)
     [--in-process]  (the store and otel sinks in the consumer's process, as before
                  sinks/child.py: to compare)
     [--otel-down]  (only: the otel sink with its default queue, its collector down for
                  the whole run: the memory the sensor and the sink's process reach, and
                  the records counted as lost, none unaccounted for)
Each run lasts until every sink has written every record (sinks/pipeline.py); an untimed
warm-up run (stdout alone, a tenth of the records) comes first. Two ratios:
the consumer's own rate (records turned into records and queued: what decides kernel
drops), and the whole run's (until the last sink is done: what a sink sustains).
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowtap.config import SensorConfig
from flowtap.events import EventDecoder
from flowtap.loader.btf import Btf
from flowtap.loader.libbpf import BpfObject
from flowtap.loader.system import bpf_object_path
from flowtap.records.http import CaptureLevel
from flowtap.records.policy import CaptureRule
from flowtap.sensor import Sensor
from flowtap.sinks.base import Sink
from flowtap.sinks.child import in_child
from flowtap.sinks.jsonl import JsonLinesSink
from flowtap.sinks.otel import OtelSettings, OtelSink
from flowtap.sinks.pipeline import BatchSink, Pipeline
from flowtap.store.sink import StoreSink

REQUEST = (
    b"GET /body100 HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nUser-Agent: bench\r\n"
    b"Accept: */*\r\nAuthorization: Bearer abc\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 01:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
    b"Connection: keep-alive\r\n\r\n" + b"y" * 99 + b"\n"
)


def records(btf: Btf, count: int) -> list[bytes]:
    """An open, count request/response pairs of TLS plaintext, then a close."""
    kinds, flows = btf.enum_values("ft_event_kind"), btf.enum_values("ft_flow")
    sources, directions = btf.enum_values("ft_source"), btf.enum_values("ft_direction")
    conn: dict[str, int | bytes] = {
        "conn.conn_id": 1,
        "conn.family": 2,
        "conn.protocol": 6,
        "conn.direction": directions["FT_DIR_EGRESS"],
        "conn.local_port": 40000,
        "conn.remote_port": 8443,
        "conn.local_addr": bytes([127, 0, 0, 1]),
        "conn.remote_addr": bytes([127, 0, 0, 1]),
        "task.pid": 1,
        "task.tid": 1,
        "task.comm": b"bench",
    }
    opened = btf.struct_layout("ft_conn_open_event").pack(
        {"hdr.kind": kinds["FT_EVENT_CONN_OPEN"], "hdr.timestamp_ns": 1, **conn}
    )
    head = btf.struct_layout("ft_data_event").head()
    out = [opened]
    for i in range(count):
        for flow, payload in (("FT_FLOW_TX", REQUEST), ("FT_FLOW_RX", RESPONSE)):
            position = i * len(payload)
            fields: dict[str, int | bytes] = {
                "hdr.kind": kinds["FT_EVENT_DATA"],
                "hdr.timestamp_ns": 10 + 2 * i,
                "conn_id": 1,
                "position": position,
                "flow": flows[flow],
                "length": len(payload),
                "source": sources["FT_SOURCE_OPENSSL"],
            }
            out.append(head.pack(fields) + payload)
    out.append(
        btf.struct_layout("ft_conn_close_event").pack(
            {"hdr.kind": kinds["FT_EVENT_CONN_CLOSE"], "hdr.timestamp_ns": 10**9, **conn}
        )
    )
    return out


def _rules(count: int) -> tuple[CaptureRule, ...]:
    """Rules that read several fields and match nothing: every one is evaluated."""
    return tuple(
        CaptureRule(
            f"rule {n}",
            f'http.req.host == "api{n}.example.com" and http.res.status >= 500 '
            f'or src.process.binary == "tool{n}" and http.req.path starts_with "/v{n}/"',
            "full",
            "bench",
        )
        for n in range(count)
    )


def _run(
    config: SensorConfig,
    raw: list[bytes],
    btf: Btf,
    *,
    store: Path | None = None,
    otel_port: int | None = None,
    in_process: bool = False,
    otel_queue: int | None = None,
) -> tuple[float, float, Sensor, Pipeline]:
    """Until every sink has written every record: queues large enough that none is dropped
    (this measures throughput, not what a full queue costs), unless otel_queue says how
    big the otel sink's is."""
    sinks: list[tuple[str, Sink | BatchSink]] = [
        ("stdout", JsonLinesSink(io.StringIO(), owned=False))
    ]
    capacity = len(raw) + 10
    if store is not None:
        if in_process:
            sinks.append(("store", StoreSink(store)))
        else:
            sinks.append(
                (
                    "store",
                    in_child("store", "flowtap.store.sink", "StoreSink", store, capacity=capacity),
                )
            )
    if otel_port is not None:
        queue = otel_queue or capacity
        settings = OtelSettings(f"127.0.0.1:{otel_port}", insecure=True, queue=queue)
        if in_process:
            sinks.append(("otel", OtelSink(settings)))
        else:
            otel = in_child("otel", "flowtap.sinks.otel", "OtelSink", settings, capacity=queue)
            sinks.append(("otel", otel))
    pipeline = Pipeline(sinks, capacity=capacity, flush_s=3600.0)
    sensor = Sensor(config, pipeline)
    sensor._decoder = EventDecoder(btf)  # the decoder start() would set up
    start = time.perf_counter()
    for record in raw:
        sensor._on_record(record)
    consumed = time.perf_counter() - start
    pipeline.close()
    elapsed = time.perf_counter() - start
    print(f"  the consumer itself took {consumed:.2f} s of it", file=sys.stderr)
    return elapsed, consumed, sensor, pipeline


# A loopback OTLP/gRPC receiver (the tests'): prints its port, ends when stdin closes.
_RECEIVER = """
import sys
from tests.e2e.otlp_receiver import GrpcReceiver
receiver = GrpcReceiver()
receiver.start()
print(receiver.port, flush=True)
sys.stdin.read()
receiver.stop()
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.consumer", description=__doc__)
    parser.add_argument("--transactions", type=int, default=50_000)
    parser.add_argument("--level", default="summary", choices=("summary", "headers", "full"))
    parser.add_argument(
        "--store",
        action="store_true",
        help="also run with the SQLite store as a second sink, and print the ratio",
    )
    parser.add_argument(
        "--rules",
        type=int,
        default=0,
        metavar="N",
        help="also run with N capture rules that match nothing, and print the ratio",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="also run with the otel sink (to a loopback OTLP/gRPC receiver), and print "
        "the ratio; with --store, also with both",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the store and otel sinks in the consumer's process (no child processes)",
    )
    parser.add_argument(
        "--otel-down",
        action="store_true",
        help="only this: the otel sink (default queue) to a collector that is down; prints "
        "the peak memory of the sensor's process and of the sink's, and what was lost",
    )
    args = parser.parse_args(argv)
    if args.otel_down:
        return _otel_down(args.transactions, args.level)
    receiver: subprocess.Popen[str] | None = None
    otel_port = 0
    if args.otel:
        # The receiver runs in its own process: its decoding must not share our core.
        receiver = subprocess.Popen(
            [sys.executable, "-c", _RECEIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert receiver.stdout is not None
        otel_port = int(receiver.stdout.readline())
    obj = BpfObject.open(bpf_object_path("conn.bpf.o"))
    workdir = Path(tempfile.mkdtemp(prefix="flowtap-bench-"))
    try:
        btf = Btf(obj)
        raw = records(btf, args.transactions)
        runs = [("no rules", SensorConfig(capture_level=args.level))]
        if args.rules:
            config = SensorConfig(capture_level=args.level, http_rules=_rules(args.rules))
            runs.append((f"{args.rules} rules", config))
        if args.store:
            runs.append(("with --store", SensorConfig(capture_level=args.level)))
        if args.otel:
            runs.append(("with otel", SensorConfig(capture_level=args.level)))
            if args.store:
                runs.append(("with --store and otel", SensorConfig(capture_level=args.level)))
        # Untimed: the first run in a process pays for first-time work (allocations, code
        # paths' first calls) that would otherwise count against the stdout-alone baseline.
        warmup = raw[: len(raw) // 10] + raw[-1:]
        _run(SensorConfig(capture_level=args.level), warmup, btf)
        rates: list[float] = []
        consumer_rates: list[float] = []
        for name, config in runs:
            store = workdir / f"{len(rates)}.db" if "--store" in name else None
            port = otel_port if "otel" in name else None
            elapsed, consumed, sensor, pipeline = _run(
                config, raw, btf, store=store, otel_port=port, in_process=args.in_process
            )
            lost = {
                k: (v.errors, v.dropped)
                for k, v in pipeline.stats().items()
                if v.errors or v.dropped
            }
            if lost:
                print(f"consumer: records lost by sinks (errors, dropped): {lost}", file=sys.stderr)
                return 1
            made = sensor.payloads.stats.transactions
            if made != args.transactions:
                print(
                    f"consumer: expected {args.transactions} transactions, got {made}",
                    file=sys.stderr,
                )
                return 1
            rates.append(made / elapsed)
            consumer_rates.append(made / consumed)
            print(
                f"{name}: {made:,} transactions ({len(raw):,} ring-buffer records, level "
                f"{args.level}) in {elapsed:.2f} s: {made / elapsed:,.0f} transactions/s, "
                f"{elapsed / made * 1e6:.1f} µs each, on one core"
            )
    finally:
        obj.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if receiver is not None:
            receiver.communicate("", timeout=30)  # its stdin closed: it ends
    if args.rules:
        print(f"ratio with {args.rules} rules / without: {rates[1] / rates[0]:.2f}")
    where = "in the consumer's process" if args.in_process else "in child processes"
    for (name, _config), rate, consumer in zip(runs, rates, consumer_rates, strict=True):
        if "--store" in name or "otel" in name:
            print(
                f"ratio {name} / stdout alone ({where}): consumer "
                f"{consumer / consumer_rates[0]:.2f}, whole run {rate / rates[0]:.2f}"
            )
    return 0


def _dead_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _otel_down(transactions: int, level: CaptureLevel) -> int:
    """The collector is down for the whole run: the sink's bounded queue fills, its
    records are counted, and memory stays bounded whatever the number of records."""
    obj = BpfObject.open(bpf_object_path("conn.bpf.o"))
    try:
        btf = Btf(obj)
        raw = records(btf, transactions)
        before = _peak_rss_mib(resource.RUSAGE_SELF)
        elapsed, consumed, sensor, pipeline = _run(
            SensorConfig(capture_level=level),
            raw,
            btf,
            otel_port=_dead_port(),
            otel_queue=SensorConfig().sink_queue,
        )
    finally:
        obj.close()
    otel = pipeline.stats()["otel"]
    made = sensor.payloads.stats.transactions
    records_made = sensor.counters.records
    accounted = otel.written + otel.errors + otel.dropped
    print(
        f"otel collector down: {made:,} transactions, {records_made:,} records in "
        f"{elapsed:.2f} s (the consumer {consumed:.2f} s); otel sink: written {otel.written:,}, "
        f"errors {otel.errors:,}, dropped {otel.dropped:,} (accounted {accounted:,} of "
        f"{records_made:,})"
    )
    print(
        f"peak memory: the sensor's process {_peak_rss_mib(resource.RUSAGE_SELF):.0f} MiB "
        f"({before:.0f} MiB before the run, records built in memory included); the sink's "
        f"process {_peak_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB"
    )
    return 0 if accounted == records_made else 1


if __name__ == "__main__":
    sys.exit(main())
