"""The exec gate's costs (docs/program-start.md), in one run:

  hold: how long the first exec of a never-seen executable is held (classification and
        attach), p50 and max over --runs fresh copies of a small Go program (tlspeer,
        built here from tests/e2e/go) and of node (/usr/bin/node, ~99 MB), read from the
        sensor's "exec held N ms" log lines;
  exec: a loop of fork+exec of a copy of /bin/true (--execs times) without and with the
        sensor, interleaved pairs; with the sensor the file is known after its first
        exec (ignore mark), which is the steady state. Ratios: rate with / rate without,
        and CPU per exec (the loop's and its children's) without / with; and the
        sensor's own CPU per exec.

The sensor marks only a tmpfs this benchmark mounts (--exec-gate-path), and is scoped to
a cgroup it makes, so nothing else on the host is held.

Run (as root, from the repository root): .venv/bin/python -m bench.exec_gate [--runs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import (
    REPO,
    BenchError,
    Sensor,
    bench_cgroup,
    command_line,
    require_root,
    require_sensor,
    scratch_dir,
)

GO_SOURCE = REPO / "tests" / "e2e" / "go" / "tlspeer.go"
NODE = Path("/usr/bin/node")
_HELD = re.compile(r"exec held ([0-9.]+) ms: (\S+)")
_SPLIT = re.compile(r"exec gate: (\S+) read in ([0-9.]+) ms, probed in ([0-9.]+) ms")


@contextlib.contextmanager
def tmpfs(point: Path) -> Iterator[Path]:
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "flowtap-bench", str(point)],
                   check=True, timeout=10)  # fmt: skip
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], timeout=10)


def build_go(workdir: Path) -> Path:
    out = workdir / "tlspeer"
    env = {**os.environ, "GOCACHE": str(workdir / "gocache"), "GO111MODULE": "off",
           "CGO_ENABLED": "0", "GOPATH": str(workdir / "gopath")}  # fmt: skip
    subprocess.run(["go", "build", "-o", str(out), str(GO_SOURCE)], check=True, env=env,
                   timeout=300, capture_output=True)  # fmt: skip
    return out


def in_cgroup(cgroup: Path) -> None:
    (cgroup / "cgroup.procs").write_text("0")


def run_in(cgroup: Path, argv: list[str]) -> None:
    subprocess.run(argv, preexec_fn=lambda: in_cgroup(cgroup), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60, check=False)  # fmt: skip


def exec_loop(cgroup: Path, program: Path, count: int) -> tuple[float, float]:
    """fork+exec+wait of program `count` times in a child in the cgroup: (execs/s, CPU
    per exec in µs). The CPU time (user and system, of the loop and its children) holds
    what the kernel's hooks cost the exec'ing processes, and moves far less than the
    rate with what else this shared machine runs."""
    code = (
        "import os,resource,sys,time\n"
        "p=sys.argv[1]; n=int(sys.argv[2]); t=time.perf_counter()\n"
        "for _ in range(n):\n"
        "    os.waitpid(os.posix_spawn(p,[p],{}),0)\n"
        "rate=n/(time.perf_counter()-t)\n"
        "cpu=sum(r.ru_utime+r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),"
        "resource.getrusage(resource.RUSAGE_CHILDREN)))\n"
        "print(rate, cpu/n*1e6)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(program), str(count)],
                          preexec_fn=lambda: in_cgroup(cgroup), capture_output=True,
                          text=True, timeout=600, check=True)  # fmt: skip
    rate, cpu_us = done.stdout.split()
    return float(rate), float(cpu_us)


def sensor_cpu_s(pid: int) -> float:
    """User and system time of a running process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"n": 0, "p50_ms": None, "max_ms": None}
    return {"n": len(samples), "p50_ms": round(statistics.median(samples), 1),
            "max_ms": round(max(samples), 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="fresh copies per program")
    parser.add_argument("--execs", type=int, default=2000, help="execs per loop")
    parser.add_argument("--pairs", type=int, default=3, help="without/with pairs")
    args = parser.parse_args()
    require_root()
    require_sensor()
    work = scratch_dir("flowtap-bench-exec-")
    result: dict[str, object] = {"command": command_line("bench.exec_gate")}
    try:
        go = build_go(work)
        with bench_cgroup("flowtap-bench-exec") as cgroup, tmpfs(work / "fs") as fs:
            gate = ["--cgroup", str(cgroup), "--exec-gate-path", str(fs), "-v",
                    "--state-dir", str(work / "state")]  # fmt: skip
            (work / "hold").mkdir()
            sensor = Sensor(work / "hold", extra_args=gate)
            sensor.wait_ready()
            for run in range(args.runs):
                go_copy = fs / f"go-{run}"
                shutil.copy(go, go_copy)
                run_in(cgroup, [str(go_copy)])
                if NODE.exists():
                    node_copy = fs / f"node-{run}"
                    shutil.copy(NODE, node_copy)
                    run_in(cgroup, [str(node_copy), "-e", "0"])
                    node_copy.unlink()
            time.sleep(0.5)  # the last log lines
            stats = sensor.stop()
            text = sensor.log_path.read_text(errors="replace")
            held = _HELD.findall(text)
            split = _SPLIT.findall(text)
            for kind in ("go", "node"):
                mine = f"/{kind}-"
                result[f"hold_{kind}"] = summary([float(ms) for ms, path in held if mine in path])
                result[f"read_{kind}"] = summary([float(r) for p, r, _a in split if mine in p])
                result[f"probe_{kind}"] = summary([float(a) for p, _r, a in split if mine in p])
            result["gate"] = stats.get("exec_gate")

            true = fs / "true"
            shutil.copy("/bin/true", true)
            without: list[float] = []
            with_sensor: list[float] = []
            cpu_without: list[float] = []
            cpu_with: list[float] = []
            sensor_us: list[float] = []
            for pair in range(args.pairs):
                rate, cpu = exec_loop(cgroup, true, args.execs)
                without.append(rate)
                cpu_without.append(cpu)
                directory = work / f"exec-{pair}"
                directory.mkdir()
                sensor = Sensor(directory, extra_args=gate)
                sensor.wait_ready()
                before = sensor_cpu_s(sensor.pid)
                rate, cpu = exec_loop(cgroup, true, args.execs)
                sensor_us.append((sensor_cpu_s(sensor.pid) - before) / args.execs * 1e6)
                with_sensor.append(rate)
                cpu_with.append(cpu)
                sensor.stop()
            result["exec_per_s_without"] = [round(x) for x in without]
            result["exec_per_s_with"] = [round(x) for x in with_sensor]
            result["exec_ratio"] = round(
                statistics.median(with_sensor) / statistics.median(without), 3
            )
            result["exec_cpu_us_without"] = [round(x) for x in cpu_without]
            result["exec_cpu_us_with"] = [round(x) for x in cpu_with]
            # CPU per exec without / with: the exec's own cost ratio, less noisy.
            result["exec_cpu_ratio"] = round(
                statistics.median(cpu_without) / statistics.median(cpu_with), 3
            )
            result["sensor_cpu_us_per_exec"] = [round(x) for x in sensor_us]
    except (BenchError, subprocess.CalledProcessError) as exc:
        print(f"bench.exec_gate: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
