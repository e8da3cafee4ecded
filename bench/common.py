"""Shared pieces of the benchmarks: the C load generator, a scratch cgroup, the sensor.

Everything here talks to 127.0.0.1 only, and every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
FLOWTAP = REPO / ".venv" / "bin" / "flowtap"
LOADGEN_SOURCE = BENCH / "loadgen.c"
SHM = Path("/dev/shm")
CLK_TCK = os.sysconf("SC_CLK_TCK")

JsonDict = dict[str, Any]


class BenchError(RuntimeError):
    """A precondition or a step of a benchmark failed; the message says which."""


def command_line(module: str) -> str:
    """The command that reproduces this run (as root), from the repository root."""
    python = sys.executable
    if python.startswith(f"{REPO}/"):
        python = os.path.relpath(python, REPO)
    return f"cd {REPO} && {shlex.join([python, '-m', module, *sys.argv[1:]])}"


def require_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("run the benchmarks as root: the sensor loads eBPF programs")


def require_sensor() -> None:
    if not FLOWTAP.exists():
        raise BenchError(f"{FLOWTAP} is missing: run `make setup` first")
    objects = list((REPO / "src" / "flowtap" / "bpf").glob("*.bpf.o"))
    if not objects:
        raise BenchError("no compiled BPF object: run `make bpf` first")


def sensor_warnings() -> list[str]:
    """What makes a measurement unrepresentative of the sources: a stale BPF object."""
    warnings = []
    sources = list((REPO / "bpf").glob("*.[ch]"))
    newest_source = max((path.stat().st_mtime for path in sources), default=0.0)
    for obj in (REPO / "src" / "flowtap" / "bpf").glob("*.bpf.o"):
        if obj.stat().st_mtime < newest_source:
            warnings.append(f"{obj.relative_to(REPO)} is older than bpf/: run `make bpf`")
    return warnings


def scratch_dir(prefix: str) -> Path:
    """A private directory on tmpfs (so the sensor's output never waits on a disk)."""
    base = SHM if SHM.is_dir() else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def compile_loadgen(workdir: Path) -> Path:
    """Builds bench/loadgen.c with gcc into workdir; returns the binary."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BenchError("gcc is needed to build the load generator: apt-get install -y gcc")
    binary = workdir / "loadgen"
    subprocess.run(
        [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(LOADGEN_SOURCE)],
        check=True,
        timeout=120,
    )
    return binary


def run_loadgen(args: Sequence[str], timeout_s: float) -> JsonDict:
    """Runs the load generator to completion; returns the JSON line it prints."""
    done = subprocess.run(
        list(args), check=False, capture_output=True, text=True, timeout=timeout_s
    )
    if done.returncode != 0:
        raise BenchError(f"load generator failed ({done.returncode}): {done.stderr.strip()}")
    result: JsonDict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise BenchError("no cgroup v2 filesystem is mounted (see /proc/self/mounts)")


@contextlib.contextmanager
def bench_cgroup(name: str) -> Iterator[Path]:
    """A fresh cgroup v2 directory for the load generator; removed at the end."""
    path = cgroup2_root() / f"{name}-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(50):  # the last members may still be exiting: bounded retry
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        else:
            print(f"warning: could not remove cgroup {path}", file=sys.stderr)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5); fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


ProgStats = dict[str, tuple[int, int]]


def bpf_prog_stats(pid: int) -> ProgStats:
    """Program name -> (run_time_ns, run_cnt) for the BPF programs whose fds pid holds.

    Read from /proc/PID/fdinfo; the counters move only while BPF run-time statistics
    are enabled (see BpfStats). Names come from bpftool when it is installed.
    """
    by_id: dict[str, tuple[int, int]] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        prog_id = fields.get("prog_id", "").strip()
        if prog_id:
            by_id[prog_id] = (
                int(fields.get("run_time_ns", "0")),
                int(fields.get("run_cnt", "0")),
            )
    return {_prog_name(prog_id): value for prog_id, value in by_id.items()}


_PROG_NAMES: dict[str, str] = {}


def _prog_name(prog_id: str) -> str:
    if prog_id not in _PROG_NAMES:
        name = f"prog {prog_id}"
        bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            shown = subprocess.run(
                [bpftool, "prog", "show", "id", prog_id, "--json"],
                check=True,
                capture_output=True,
                text=True,
                timeout=10,
            )
            name = str(json.loads(shown.stdout).get("name", name))
        _PROG_NAMES[prog_id] = name
    return _PROG_NAMES[prog_id]


def prog_delta(before: ProgStats, after: ProgStats) -> ProgStats:
    return {
        name: (value[0] - before.get(name, (0, 0))[0], value[1] - before.get(name, (0, 0))[1])
        for name, value in after.items()
    }


def total_ns(stats: ProgStats) -> int:
    return sum(ns for ns, _ in stats.values())


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


class BpfStats:
    """BPF run-time accounting (BPF_ENABLE_STATS), on while this holds its fd.

    The kernel turns it off again when the fd is closed, or when this process exits.
    """

    def __init__(self) -> None:
        self._fd: int | None = None

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def enable(self) -> bool:
        if self._fd is None:
            number = _SYS_BPF.get(platform.machine())
            if number is None:
                return False
            libc = ctypes.CDLL(None, use_errno=True)
            attr = (ctypes.c_uint32 * 2)(_BPF_STATS_RUN_TIME, 0)
            size = ctypes.sizeof(attr)
            fd = int(libc.syscall(number, _BPF_ENABLE_STATS, ctypes.byref(attr), size))
            self._fd = fd if fd >= 0 else None
        return self._fd is not None

    def disable(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def foreign_sensors(own: set[int]) -> list[int]:
    """Pids of `flowtap run` processes that this benchmark did not start."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names = [os.path.basename(arg) for arg in argv[:3]]
        if b"flowtap" in names and b"run" in argv:
            found.append(int(entry.name))
    return sorted(found)


def wait_for_quiet(own: set[int], limit_s: float, *, idle_cores: float = 0.1) -> list[int]:
    """Waits up to limit_s for other flowtap sensors to exit and the host to go idle.

    Idle: less than idle_cores of busy (not idle) CPU over half a second (this benchmark's
    own processes are idle while it waits). Returns the other sensors still running.
    """
    deadline = time.monotonic() + limit_s
    while True:
        others = foreign_sensors(own)
        idle_before, _ = _idle_seconds()
        start = time.monotonic()
        time.sleep(0.5)
        busy = _busy_seconds(time.monotonic() - start, idle_before) / 0.5
        if (not others and busy < idle_cores) or time.monotonic() >= deadline:
            return others


def _idle_seconds(cpu: int | None = None) -> tuple[float, int]:
    """(idle + iowait seconds, number of CPUs counted) of all CPUs or of one.

    Idle time is exact on NO_HZ kernels, unlike the tick-sampled user and system times,
    so "busy" is taken as wall time minus idle time.
    """
    idle, cpus = 0.0, 0
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        if cpu is None or fields[0] == f"cpu{cpu}":
            idle += (int(fields[4]) + int(fields[5])) / CLK_TCK
            cpus += 1
    return idle, cpus


def _busy_seconds(wall_s: float, idle_before: float, cpu: int | None = None) -> float:
    idle_after, cpus = _idle_seconds(cpu)
    return max(wall_s * cpus - (idle_after - idle_before), 0.0)


def _rusage_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuWindow:
    """CPU use over a window: the host's, ours (this process, children, watched pids)."""

    watched: list[int]
    cpu: int | None = None  # also measure this CPU alone (the pinned sensor's)
    start_wall: float = 0.0
    start_idle: float = 0.0
    start_ours: float = 0.0
    start_cpu_idle: float = 0.0
    wall_s: float = 0.0
    busy_s: float = 0.0
    ours_s: float = 0.0
    cpu_busy_s: float = 0.0

    def _ours(self) -> float:
        total = _rusage_seconds(resource.RUSAGE_SELF) + _rusage_seconds(resource.RUSAGE_CHILDREN)
        for pid in self.watched:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += cpu_seconds(pid)
        return total

    def __enter__(self) -> CpuWindow:
        self.start_wall = time.monotonic()
        self.start_idle, _ = _idle_seconds()
        self.start_ours = self._ours()
        self.start_cpu_idle = _idle_seconds(self.cpu)[0] if self.cpu is not None else 0.0
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall_s = time.monotonic() - self.start_wall
        self.busy_s = _busy_seconds(self.wall_s, self.start_idle)
        self.ours_s = self._ours() - self.start_ours
        if self.cpu is not None:
            self.cpu_busy_s = _busy_seconds(self.wall_s, self.start_cpu_idle, self.cpu)

    @property
    def foreign_cores(self) -> float:
        """CPU that neither the benchmark nor its processes used, per second of wall time."""
        if self.wall_s <= 0:
            return 0.0
        return max(self.busy_s - self.ours_s, 0.0) / self.wall_s


@dataclass
class RecordCounts:
    """What a JSON-lines output file holds, counted incrementally."""

    path: Path
    offset: int = 0
    lines: int = 0
    parsed: JsonDict = field(default_factory=dict)

    def count_new(self) -> int:
        """Counts complete lines written since the last call; returns the total."""
        try:
            with self.path.open("rb") as stream:
                stream.seek(self.offset)
                chunk = stream.read()
        except FileNotFoundError:
            return self.lines
        end = chunk.rfind(b"\n") + 1
        self.lines += chunk.count(b"\n", 0, end)
        self.offset += end
        return self.lines

    def wait_until(self, expected: int, *, idle_s: float, limit_s: float) -> float:
        """Waits until expected lines exist, or none came for idle_s; returns seconds waited."""
        start = last_growth = time.monotonic()
        seen = self.count_new()
        while seen < expected:
            now = time.monotonic()
            if now - last_growth >= idle_s or now - start >= limit_s:
                break
            time.sleep(0.05)
            current = self.count_new()
            if current != seen:
                seen, last_growth = current, time.monotonic()
        return (last_growth if seen < expected else time.monotonic()) - start


def summarize_records(path: Path) -> JsonDict:
    """Counts records by event and direction, and the close records' byte counts."""
    opens: dict[str, int] = {}
    closes: dict[str, int] = {}
    statuses: dict[str, int] = {}
    bytes_pairs: dict[str, int] = {}
    bad = 0
    with path.open("rb") as stream:
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            direction = str(record.get("direction"))
            if record.get("event") == "open":
                opens[direction] = opens.get(direction, 0) + 1
            elif record.get("event") == "close":
                closes[direction] = closes.get(direction, 0) + 1
                status = str(record.get("status"))
                statuses[status] = statuses.get(status, 0) + 1
                pair = f"{record.get('bytes_sent')}/{record.get('bytes_received')}"
                bytes_pairs[pair] = bytes_pairs.get(pair, 0) + 1
    return {
        "open": opens,
        "close": closes,
        "status": statuses,
        "bytes_sent/received": bytes_pairs,
        "unparsable": bad,
    }


class Sensor:
    """`flowtap run` as a child process: started, waited for, stopped by its own pid."""

    def __init__(
        self,
        workdir: Path,
        *,
        extra_args: Sequence[str] = (),
        cpu: int | None = None,
        flowtap: Path = FLOWTAP,
    ) -> None:
        self.workdir = workdir
        self.output = workdir / "records.jsonl"
        self.ready = workdir / "ready"
        self.stats_path = workdir / "stats.json"
        self.log_path = workdir / "sensor.log"
        for stale in (self.output, self.ready, self.stats_path):
            stale.unlink(missing_ok=True)
        command = [
            str(flowtap),
            "run",
            "--include-loopback",
            *extra_args,
            "--output",
            "json",
            "--output-file",
            str(self.output),
            "--ready-file",
            str(self.ready),
            "--stats-file",
            str(self.stats_path),
        ]
        if cpu is not None:
            command = ["taskset", "-c", str(cpu), *command]
        self.command = command
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.proc.pid

    def wait_ready(self, limit_s: float = 60.0) -> None:
        deadline = time.monotonic() + limit_s
        while not self.ready.exists():
            if self.proc.poll() is not None:
                self._log.close()
                raise BenchError(
                    f"the sensor exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"the sensor was not ready after {limit_s:.0f} s")
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, limit_s: float = 120.0) -> JsonDict:
        """SIGINT, wait for the drain and the stats file; SIGKILL after limit_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                self._log.close()
                raise BenchError(f"the sensor did not stop within {limit_s:.0f} s") from None
        self._log.close()
        if self.proc.returncode != 0:
            raise BenchError(
                f"the sensor exited with {self.proc.returncode}:\n"
                + self.log_path.read_text(errors="replace")[-2000:]
            )
        try:
            stats: JsonDict = json.loads(self.stats_path.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"no stats file from the sensor: {exc}") from None
        return stats


def total_drops(stats: JsonDict) -> int:
    drops = stats.get("drops", {})
    return sum(int(value) for value in drops.values())


def nonzero_drops(stats: JsonDict) -> str:
    drops = stats.get("drops", {})
    lost = [f"{name}={value}" for name, value in sorted(drops.items()) if value]
    return ", ".join(lost) or "0"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: JsonDict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()
    return ""


def host_facts() -> JsonDict:
    """What was measured, where: the sensor's revision (and local edits) and the host."""
    objects = sorted((REPO / "src" / "flowtap" / "bpf").glob("*.bpf.o"))
    return {
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_sensor_changes": _git(
            "status", "--porcelain", "--", "src", "bpf"
        ).splitlines(),
        "bpf_objects_sha256": {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in objects
        },
        "warnings": sensor_warnings(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
    }


def print_provenance(facts: dict[str, Any], command: str) -> None:
    """What was measured: warns if the BPF object changed during the run."""
    now = host_facts()
    if now["bpf_objects_sha256"] != facts["bpf_objects_sha256"]:
        facts["warnings"].append(
            f"the BPF object changed during the run: {facts['bpf_objects_sha256']} -> "
            f"{now['bpf_objects_sha256']} (someone ran `make bpf`): steps measured different code"
        )
    for warning in facts["warnings"]:
        print(f"warning: {warning}")
    print(
        f"sensor: git {facts['git_head']}, uncommitted changes in src/ or bpf/: "
        f"{len(facts['uncommitted_sensor_changes'])}, objects {facts['bpf_objects_sha256']}"
    )
    print(f"command: {command}")
