"""What a TLS probe hit costs the traced program, with the probes attached as uprobe_multi
links (Linux 6.6 on, the default where the kernel has them) and as one perf event per
address (`--avoid-kernel-features uprobe-multi`, what 5.10 and 6.1 get), in one run.

A Go HTTPS client (tests/e2e/go/tlspeer.go built here) makes --requests GETs on one
keep-alive connection to its own server, in a cgroup the sensor traces at
`--capture-level full`. The figure is the client's CPU time per request (user and
system, from wait4): a probe hit's trap and BPF program are charged to the process that
hits it, and CPU time moves far less than a rate with whatever else shares the machine.
Rounds interleave: without the sensor, with links, with perf events.

Run (as root, from the repository root): .venv/bin/python -m bench.probe_links [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import (
    BenchError,
    Sensor,
    bench_cgroup,
    command_line,
    require_root,
    require_sensor,
    scratch_dir,
)
from bench.slowdown import GoTls, go_tls_server

CONFIGS: dict[str, list[str] | None] = {
    "without": None,
    "uprobe_multi": [],
    "perf_events": ["--avoid-kernel-features", "uprobe-multi"],
}


def client_cpu_us(pair: GoTls, cgroup: Path, requests: int) -> float:
    """Runs the Go client in the cgroup for `requests` GETs; its CPU µs per request."""
    url = f"https://127.0.0.1:{pair.port}/items/100"
    go = pair.binary.with_name("go")  # the client waits for this file: there at once
    go.touch()
    argv = [str(pair.binary), "client", str(pair.ca), url, str(requests), "h1", str(go)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"),
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    go.unlink()
    if status != 0:
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise BenchError(f"the Go client failed ({status}): {stderr[-2000:]}")
    return (usage.ru_utime + usage.ru_stime) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--requests", type=int, default=10_000, help="GETs per client run")
    args = parser.parse_args()
    require_root()
    require_sensor()
    work = scratch_dir("flowtap-bench-links-")
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
    try:
        with bench_cgroup("flowtap-bench-links") as cgroup, go_tls_server(work, None) as pair:
            for round_ in range(args.rounds):
                for name, extra in CONFIGS.items():
                    if extra is None:
                        cpu[name].append(client_cpu_us(pair, cgroup, args.requests))
                        continue
                    directory = work / f"{name}-{round_}"
                    directory.mkdir()
                    sensor = Sensor(
                        directory,
                        extra_args=[
                            "--cgroup", str(cgroup), "--capture-level", "full",
                            "--state-dir", str(work / "state"), *extra,
                        ],
                    )  # fmt: skip
                    sensor.wait_ready()
                    cpu[name].append(client_cpu_us(pair, cgroup, args.requests))
                    stats = sensor.stop()
                    records = int(stats.get("records", 0))
                    if records < args.requests:
                        raise BenchError(f"{name}: {records} records for {args.requests} GETs")
    except (BenchError, subprocess.CalledProcessError) as exc:
        print(f"bench.probe_links: {exc}", file=sys.stderr)
        return 1
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    result = {
        "command": command_line("bench.probe_links"),
        "client_cpu_us_per_request": {k: [round(x, 1) for x in v] for k, v in cpu.items()},
        "medians": {k: round(v, 1) for k, v in medians.items()},
        # CPU per request without the sensor / with it: 1.0 is free.
        "ratio_uprobe_multi": round(medians["without"] / medians["uprobe_multi"], 3),
        "ratio_perf_events": round(medians["without"] / medians["perf_events"], 3),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
