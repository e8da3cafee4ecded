"""Slowdown of loopback workloads with the sensor attached, as ratios measured in one run.

Workloads, each run in interleaved pairs (without, with, without, with, ...); the
sensor is started before each "with" run and stopped (SIGINT, drain, stats) after it:

  (a) wrk -t1 -c10 -d5s (keep-alive) against a local nginx with one worker on a
      127.0.0.1 port, serving a small static file, from a generated config.
  (b) a tight loop, one new connection per request: connect, send 100 bytes,
      receive 100 bytes, close (bench/loadgen.c, one client, one server process).
  (c) a null system call loop (getppid): no socket at all, for what every process on
      the host pays per system call while the sensor's syscall tracepoints are on.
  (d) wrk-tls: (a) over HTTPS (a 100-byte body, TLS 1.3, keep-alive): nginx and wrk both
      on libssl.so.3, so both ends are probed; run with --sensor-args
      "--capture-level full" for the issue's full-capture figure.
  (e) go-tls: tests/e2e/go/tlspeer.go built here, its HTTPS server and its bench client
      (one keep-alive connection, a 100-byte body): Go's crypto/tls on both ends.
  (f) node-tls: tests/e2e/node_peer.js's HTTPS server and its bench client (one
      keep-alive connection, sequential GETs, a 100-byte body): node's OpenSSL, linked
      into /usr/bin/node, on memory BIOs, on both ends.
  (g) java-tls: tests/e2e/java/TlsPeer.java on Debian's OpenJDK 17: its HttpsServer
      (started once, before any sensor: probed when the first sensor starts, its agent
      inert between runs) and its HttpClient bench client (one keep-alive connection,
      sequential GETs), a new JVM per run: with the sensor, probed as it starts, so its
      run includes the attach. Run with --sensor-args "--capture-level full" for the
      issue's figure; the summary also gives each client JVM's time from start to agent.

The sensor runs as a user would run it: `--include-loopback` and no scope filter, so
it traces every connection on the host; its stats and records must show that it saw
the workload's connections. Target: each workload keeps >= 95% of its throughput.

Run (as root, from the repository root): .venv/bin/python -m bench.slowdown [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    CpuWindow,
    JsonDict,
    Sensor,
    command_line,
    compile_loadgen,
    foreign_sensors,
    host_facts,
    markdown_table,
    median,
    nonzero_drops,
    print_provenance,
    require_root,
    require_sensor,
    run_loadgen,
    scratch_dir,
    total_drops,
    wait_for_quiet,
    write_results,
)

TARGET = 0.95
WRK_CONNECTIONS = 10
INDEX_HTML = b"<!doctype html><title>flowtap</title><p>" + b"x" * 512 + b"</p>\n"
TLS_BODY = b"y" * 99 + b"\n"  # the HTTPS workload: a 100-byte body


@dataclass
class Run:
    workload: str
    with_sensor: bool
    throughput: float
    detail: JsonDict
    seen: int | None = None  # the workload's connections in the sensor's records
    expected_seen: int | None = None
    drops: int | None = None
    drop_detail: str | None = None
    sensor_cpu: float | None = None  # cores, over the run
    stats: JsonDict | None = None
    foreign_cores: float = 0.0
    foreign_sensors: list[int] = field(default_factory=list)


@dataclass
class Workload:
    name: str
    unit: str
    run: Callable[[], tuple[float, JsonDict]]
    # Records that belong to the workload, and how many opens the sensor must have seen.
    port: Callable[[], int | None]
    expected_opens: Callable[[JsonDict], int]
    # Long-lived processes of the workload (not children waited for during a run).
    pids: Callable[[], list[int]] = list
    target: float = TARGET  # the ratio it must keep (Java: the 0.85)


# --- tools -------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


def ensure_tools(install: bool) -> tuple[str, str]:
    """nginx and wrk; installs the Debian packages when missing (and allowed)."""
    nginx, wrk = find_tool("nginx"), find_tool("wrk")
    if (nginx is None or wrk is None) and install:
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        apt = ["apt-get", "install", "-y", "-q", "nginx", "wrk"]
        print("installing nginx and wrk: " + " ".join(apt), file=sys.stderr)
        if subprocess.run(apt, env=env, check=False, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False, timeout=900)
            subprocess.run(apt, env=env, check=False, timeout=900)
        nginx, wrk = find_tool("nginx"), find_tool("wrk")
    if nginx is None or wrk is None:
        raise BenchError("nginx and wrk are needed: apt-get install -y nginx wrk")
    return nginx, wrk


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(port: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000000;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    types {{ text/html html; }}
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
        location / {{ }}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {dir}/server.pem;
        ssl_certificate_key {dir}/server.key;
        ssl_session_cache off;
        root {dir}/www;
        location / {{ }}
    }}
}}
"""


def process_tree(pid: int) -> list[int]:
    """pid and its descendants now running (bounded depth)."""
    tree, frontier = [pid], [pid]
    for _ in range(8):
        found = []
        for parent in frontier:
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
                found += [int(child) for child in text.split()]
        if not found:
            break
        tree += found
        frontier = found
    return tree


@dataclass
class Nginx:
    port: int
    tls_port: int
    master: int

    def pids(self) -> list[int]:
        return process_tree(self.master)


def pinned(command: list[str], cpu: int | None) -> list[str]:
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


@contextlib.contextmanager
def nginx_server(nginx: str, workdir: Path, cpu: int | None) -> Iterator[Nginx]:
    """nginx, one worker, on a free 127.0.0.1 port, from a config generated in workdir."""
    port, tls_port = free_port(), free_port()
    (workdir / "www").mkdir()
    (workdir / "tmp").mkdir()
    (workdir / "www" / "index.html").write_bytes(INDEX_HTML)
    (workdir / "www" / "body100").write_bytes(TLS_BODY)
    self_signed_certificate(workdir)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port, tls_port=tls_port))
    log = (workdir / "nginx.out").open("wb")
    proc = subprocess.Popen(
        pinned([nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")], cpu),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_listening(port, 15.0)
            wait_listening(tls_port, 15.0)
        except BenchError:
            proc.poll()
            text = (workdir / "nginx.out").read_text(errors="replace")
            raise BenchError(f"nginx did not start (exit {proc.returncode}): {text}") from None
        yield Nginx(port, tls_port, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its worker
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


def self_signed_certificate(workdir: Path) -> None:
    """server.pem and server.key (EC P-256) for nginx's TLS listener."""
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"]
    command += ["ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]  # Go checks SANs only
    command += ["-keyout", str(workdir / "server.key"), "-out", str(workdir / "server.pem")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise BenchError(f"openssl could not make a certificate: {done.stderr}")


GO_PEER_SOURCE = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "go" / "tlspeer.go"


@dataclass
class GoTls:
    """The Go HTTPS pair: tlspeer's server, and its bench client run for each measurement."""

    binary: Path
    ca: Path
    port: int
    server: int

    def pids(self) -> list[int]:
        return [self.server]


@contextlib.contextmanager
def go_tls_server(workdir: Path, cpu: int | None) -> Iterator[GoTls]:
    """tests/e2e/go/tlspeer.go built with Debian's golang-go, serving HTTPS on 127.0.0.1."""
    go = find_tool("go")
    if go is None:
        raise BenchError("the go-tls workload needs Go: apt-get install -y golang-go")
    binary = workdir / "tlspeer"
    env = os.environ | {
        "GOCACHE": str(workdir / "gocache"),
        "GOPATH": str(workdir / "gopath"),
        "GO111MODULE": "off",
        "CGO_ENABLED": "0",
    }
    built = subprocess.run(
        [go, "build", "-o", str(binary), str(GO_PEER_SOURCE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if built.returncode != 0:
        raise BenchError(f"go build failed: {built.stderr}")
    self_signed_certificate(workdir)
    proc = subprocess.Popen(
        pinned(
            [str(binary), "server", str(workdir / "server.pem"), str(workdir / "server.key")], cpu
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(json.loads(proc.stdout.readline())["port"])
        yield GoTls(binary, workdir / "server.pem", port, proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def run_go_client(pair: GoTls, seconds: int, cpu: int | None) -> tuple[float, JsonDict]:
    url = f"https://127.0.0.1:{pair.port}/items/100"
    command = pinned([str(pair.binary), "bench", str(pair.ca), url, str(seconds), "h1"], cpu)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"the Go client failed ({done.returncode}): {done.stderr[-2000:]}")
    result: JsonDict = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["rate"]), {"command": " ".join(command), "requests": result["requests"]}


NODE_PEER = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "node_peer.js"
JAVA_PEER = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "java" / "TlsPeer.java"
JDK = Path("/usr/lib/jvm/java-17-openjdk-amd64/bin")
JAVA_STORE_PASSWORD = "changeit"


@dataclass
class JavaTls:
    """The Java HTTPS pair: TlsPeer's HttpsServer, and its bench client run per measurement."""

    classes: Path
    trust: Path
    port: int
    server: int

    def pids(self) -> list[int]:
        return [self.server]


def _run_tool(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise BenchError(f"{what} failed: {done.stdout[-1000:]}{done.stderr[-1000:]}")


@contextlib.contextmanager
def java_tls_server(workdir: Path, cpu: int | None) -> Iterator[JavaTls]:
    """TlsPeer compiled with Debian's javac, its HttpsServer on a self-signed certificate."""
    if not (JDK / "javac").exists():
        raise BenchError("the java-tls workload needs apt-get install -y openjdk-17-jdk-headless")
    classes = workdir / "classes"
    _run_tool([str(JDK / "javac"), "--release", "11", "-d", str(classes), str(JAVA_PEER)], "javac")
    self_signed_certificate(workdir)
    keys, trust = workdir / "server.p12", workdir / "trust.p12"
    _run_tool(
        ["openssl", "pkcs12", "-export", "-in", str(workdir / "server.pem"), "-inkey",
         str(workdir / "server.key"), "-out", str(keys), "-passout",
         f"pass:{JAVA_STORE_PASSWORD}"],
        "openssl pkcs12",
    )  # fmt: skip
    _run_tool(
        [str(JDK / "keytool"), "-importcert", "-noprompt", "-alias", "server", "-file",
         str(workdir / "server.pem"), "-keystore", str(trust), "-storetype", "PKCS12",
         "-storepass", JAVA_STORE_PASSWORD],
        "keytool",
    )  # fmt: skip
    # TCP_NODELAY: the server writes headers and body apart, which Nagle and delayed ACKs
    # would turn into ~40 ms a request.
    argv = [str(JDK / "java"), "-Dsun.net.httpserver.nodelay=true", "-cp", str(classes)]
    argv += ["TlsPeer", "server", str(keys)]
    argv.append(JAVA_STORE_PASSWORD)
    proc = subprocess.Popen(
        pinned(argv, cpu), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(json.loads(proc.stdout.readline())["port"])
        yield JavaTls(classes, trust, port, proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def run_java_client(pair: JavaTls, seconds: int, cpu: int | None) -> tuple[float, JsonDict]:
    url = f"https://127.0.0.1:{pair.port}/"
    trust = [f"-Djavax.net.ssl.trustStore={pair.trust}", "-Djavax.net.ssl.trustStoreType=PKCS12"]
    trust.append(f"-Djavax.net.ssl.trustStorePassword={JAVA_STORE_PASSWORD}")
    argv = [str(JDK / "java"), *trust, "-cp", str(pair.classes), "TlsPeer", "bench", url]
    command = pinned([*argv, str(seconds)], cpu)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise BenchError("the Java client did not finish") from None
    if proc.returncode != 0:
        raise BenchError(f"the Java client failed ({proc.returncode}): {err[-2000:]}")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    result: JsonDict = next(line for line in lines if line.get("event") == "result")
    return float(result["rate"]), {
        "command": " ".join(command),
        "requests": result["requests"],
        "client_pid": proc.pid,
    }


def java_ready_ms(stats: JsonDict | None, pid: object) -> int | None:
    """A JVM's time from its start to its agent in place, from the sensor's stats."""
    for jvm in ((stats or {}).get("java") or {}).get("jvms", []):
        if jvm.get("pid") == pid and jvm.get("probed"):
            ready: int | None = jvm.get("ms_after_start")
            return ready
    return None


@dataclass
class NodeTls:
    """The node HTTPS pair: node_peer.js's server, and its bench client run per measurement."""

    node: str
    cert: Path
    port: int
    server: int

    def pids(self) -> list[int]:
        return [self.server]


@contextlib.contextmanager
def node_tls_server(workdir: Path, cpu: int | None) -> Iterator[NodeTls]:
    """tests/e2e/node_peer.js's HTTPS server (node's https, OpenSSL in the executable)."""
    node = find_tool("node")
    if node is None:
        raise BenchError("the node-tls workload needs node: apt-get install -y nodejs")
    self_signed_certificate(workdir)
    argv = [node, str(NODE_PEER), "server", str(workdir / "server.pem")]
    argv.append(str(workdir / "server.key"))
    proc = subprocess.Popen(
        pinned(argv, cpu), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(json.loads(proc.stdout.readline())["port"])
        yield NodeTls(node, workdir / "server.pem", port, proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def run_node_client(pair: NodeTls, seconds: int, cpu: int | None) -> tuple[float, JsonDict]:
    url = f"https://127.0.0.1:{pair.port}/items/100"
    # The last argument is node_peer's go file: one that exists, so it starts at once.
    command = pinned([pair.node, str(NODE_PEER), "bench", url, str(seconds), str(pair.cert)], cpu)
    env = os.environ | {"NODE_EXTRA_CA_CERTS": str(pair.cert)}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"the node client failed ({done.returncode}): {done.stdout[-2000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result: JsonDict = next(line for line in lines if line.get("event") == "result")
    return float(result["rate"]), {"command": " ".join(command), "requests": result["requests"]}


_RPS = re.compile(r"Requests/sec:\s+([0-9.]+)")


def run_wrk(wrk: str, url: str, seconds: int, cpu: int | None) -> tuple[float, JsonDict]:
    command = [wrk, "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", url]
    command = pinned(command, cpu)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    match = _RPS.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    if "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
        raise BenchError(f"wrk saw errors:\n{done.stdout}")
    requests = re.search(r"(\d+) requests in", done.stdout)
    return float(match.group(1)), {
        "command": " ".join(command),
        "requests": int(requests.group(1)) if requests else None,
    }


# --- the measurement ---------------------------------------------------------------


def count_workload_opens(path: Path, port: int) -> int:
    """Open records of connections to or from 127.0.0.1:port, both directions."""
    needle = f'"port":{port}'.encode()
    opens = 0
    with path.open("rb") as stream:
        for line in stream:
            if needle not in line or b'"event":"open"' not in line:
                continue
            record: JsonDict = json.loads(line)
            ports = (record.get("local", {}).get("port"), record.get("remote", {}).get("port"))
            if port in ports and record.get("remote", {}).get("ip") == "127.0.0.1":
                opens += 1
    return opens


def measure(
    workload: Workload,
    *,
    with_sensor: bool,
    wait_quiet: float,
    sensor_cpu: int | None = None,
    sensor_args: Sequence[str] = (),
) -> Run:
    others = wait_for_quiet(set(), wait_quiet)
    if not with_sensor:
        with CpuWindow(workload.pids()) as window:
            throughput, detail = workload.run()
        return Run(
            workload=workload.name,
            with_sensor=False,
            throughput=throughput,
            detail=detail,
            foreign_cores=window.foreign_cores,
            foreign_sensors=sorted(set(others + foreign_sensors(set()))),
        )
    workdir = scratch_dir("flowtap-slowdown.")
    try:
        sensor = Sensor(workdir, cpu=sensor_cpu, extra_args=sensor_args)
        try:
            sensor.wait_ready()
            cpu0 = sensor.cpu_seconds()
            with CpuWindow([sensor.pid, *workload.pids()]) as window:
                throughput, detail = workload.run()
            cpu1 = sensor.cpu_seconds()
            others += foreign_sensors({sensor.pid})
        finally:
            stats = sensor.stop()
        port = workload.port()
        seen = count_workload_opens(sensor.output, port) if port is not None else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Run(
        workload=workload.name,
        with_sensor=True,
        throughput=throughput,
        detail=detail,
        seen=seen,
        expected_seen=workload.expected_opens(detail) if port is not None else None,
        drops=total_drops(stats),
        drop_detail=nonzero_drops(stats),
        sensor_cpu=(cpu1 - cpu0) / window.wall_s,
        stats={k: v for k, v in stats.items() if k != "events_by_kind"}
        | {"events_by_kind": stats.get("events_by_kind", {})},
        foreign_cores=window.foreign_cores,
        foreign_sensors=sorted(set(others)),
    )


@dataclass
class Summary:
    workload: str
    unit: str
    pairs: int
    without: float
    with_sensor: float
    ratio: float
    meets_target: bool
    sensor_saw: str
    drops: str
    sensor_cpu: float
    foreign_cores: float
    added_us: float  # extra time per unit of work (one request, connection or call)


def summarize(workload: Workload, runs: list[Run]) -> Summary:
    without = median([r.throughput for r in runs if not r.with_sensor])
    traced = [r for r in runs if r.with_sensor]
    with_sensor = median([r.throughput for r in traced])
    ratio = with_sensor / without
    if all(r.seen is not None for r in traced):
        seen = [f"{r.seen}/{r.expected_seen}" for r in traced]
        saw = ", ".join(seen)
        ready = [java_ready_ms(r.stats, r.detail.get("client_pid")) for r in traced]
        if any(ms is not None for ms in ready):
            saw += "; client JVM's agent in place after (ms): " + ", ".join(map(str, ready))
    else:
        saw = ", ".join(str(r.stats.get("connections_opened") if r.stats else "?") for r in traced)
    counters: dict[str, int] = {}
    for run in traced:
        for name, value in ((run.stats or {}).get("drops") or {}).items():
            counters[name] = counters.get(name, 0) + int(value)
    lost = ", ".join(f"{name}={value:,}" for name, value in sorted(counters.items()) if value)
    return Summary(
        workload=workload.name,
        unit=workload.unit,
        pairs=len(traced),
        without=without,
        with_sensor=with_sensor,
        ratio=ratio,
        meets_target=ratio >= workload.target,
        sensor_saw=saw,
        drops=lost or "0",
        added_us=1e6 / with_sensor - 1e6 / without,
        sensor_cpu=median([r.sensor_cpu or 0.0 for r in traced]),
        foreign_cores=max(r.foreign_cores for r in runs),
    )


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def summary_table(summaries: list[Summary]) -> str:
    headers = [
        "workload",
        "pairs",
        "without sensor (median)",
        "with sensor (median)",
        "ratio with/without",
        "meets its target (0.95; Java 0.85)?",
        "added time per unit (µs)",
        "workload opens in records / expected, per traced run",
        "drops (sum over traced runs)",
        "sensor CPU (cores, median)",
        "max other CPU (cores)",
    ]
    rows = [
        [
            s.workload,
            s.pairs,
            f"{fmt(s.without)} {s.unit}",
            f"{fmt(s.with_sensor)} {s.unit}",
            f"{s.ratio:.3f}",
            "yes" if s.meets_target else "NO",
            fmt(s.added_us, 3),
            s.sensor_saw,
            s.drops,
            fmt(s.sensor_cpu, 2),
            fmt(s.foreign_cores, 2),
        ]
        for s in summaries
    ]
    return markdown_table(headers, rows)


def runs_table(runs: list[Run], units: dict[str, str]) -> str:
    headers = ["#", "workload", "sensor", "throughput", "sensor stats", "other CPU (cores)"]
    rows: list[list[Any]] = []
    for index, run in enumerate(runs, 1):
        stats = run.stats or {}
        text = "-"
        if run.with_sensor:
            text = (
                f"opened {stats.get('connections_opened')}, records {stats.get('records')}, "
                f"drops {run.drop_detail}, CPU {run.sensor_cpu or 0:.2f}"
            )
        other = fmt(run.foreign_cores, 2)
        if run.foreign_sensors:
            other += f" + other flowtap {','.join(map(str, run.foreign_sensors))}"
        rows.append(
            [
                index,
                run.workload,
                "with" if run.with_sensor else "without",
                f"{fmt(run.throughput)} {units[run.workload]}",
                text,
                other,
            ]
        )
    return markdown_table(headers, rows)


# --- main --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.slowdown",
        description="Slowdown of loopback workloads with flowtap attached (root, by hand).",
    )
    parser.add_argument("--quick", action="store_true", help="2 pairs of 2 s runs")
    parser.add_argument("--pairs", type=int, help="without/with pairs per workload (default 5)")
    parser.add_argument("--seconds", type=int, help="length of each run (default 5)")
    parser.add_argument(
        "--workloads",
        default="wrk,loop,syscalls",
        help="comma-separated subset of wrk,loop,syscalls,wrk-tls,go-tls,node-tls,java-tls",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=0,
        help="pin every workload process (client and server) to this CPU, -1: no pinning "
        "(unpinned, cross-CPU wake-ups make loopback throughput vary by +-30%% run to run); "
        "the sensor is never pinned",
    )
    parser.add_argument(
        "--sensor-cpu",
        type=int,
        default=-1,
        help="pin the sensor to this CPU (-1: not pinned, as a user would run it); with the "
        "workload on another CPU this separates the in-kernel cost from CPU contention",
    )
    parser.add_argument(
        "--sensor-args",
        default="",
        metavar="ARGS",
        help='extra flowtap run arguments, e.g. "--capture-level none"',
    )
    parser.add_argument(
        "--scope",
        choices=("host", "server"),
        default="host",
        help="host: the sensor traces every process (default); server: only the "
        "workload's server (--pid on nginx's master), e.g. for one end's transactions/s",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get install")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="before each run, wait this long at most for other flowtap sensors to exit "
        "and the host to go idle",
    )
    args = parser.parse_args(argv)
    if args.pairs is None:
        args.pairs = 2 if args.quick else 5
    if args.seconds is None:
        args.seconds = 2 if args.quick else 5
    if args.cpu < 0:
        args.cpu = None
    if args.sensor_cpu < 0:
        args.sensor_cpu = None
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    known = {"wrk", "loop", "syscalls", "wrk-tls", "go-tls", "node-tls", "java-tls"}
    unknown = set(args.workloads) - known
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if not 1 <= args.pairs <= 20 or not 1 <= args.seconds <= 60:
        parser.error("--pairs must be in [1, 20] and --seconds in [1, 60]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("bench.slowdown")
    try:
        require_root()
        require_sensor()
        wants_nginx = {"wrk", "wrk-tls"} & set(args.workloads)
        nginx, wrk = ensure_tools(not args.no_install) if wants_nginx else ("", "")
    except BenchError as exc:
        print(f"slowdown: {exc}", file=sys.stderr)
        return 2
    facts = host_facts()
    for warning in facts["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    workdir = scratch_dir("flowtap-slowdown-tools.")
    runs: list[Run] = []
    summaries: list[Summary] = []
    units: dict[str, str] = {}
    try:
        loadgen = compile_loadgen(workdir)
        cpu: int | None = args.cpu
        pin = ["-a", str(cpu)] if cpu is not None else []
        with contextlib.ExitStack() as stack:
            workloads: list[Workload] = []
            if "wrk" in args.workloads:
                nginx_dir = workdir / "nginx"
                nginx_dir.mkdir()
                server = stack.enter_context(nginx_server(nginx, nginx_dir, cpu))
                workloads.append(
                    Workload(
                        name=f"(a) wrk -t1 -c{WRK_CONNECTIONS} -d{args.seconds}s, nginx 1 worker",
                        unit="req/s",
                        run=lambda: run_wrk(
                            wrk, f"http://127.0.0.1:{server.port}/index.html", args.seconds, cpu
                        ),
                        port=lambda: server.port,
                        expected_opens=lambda _detail: 2 * WRK_CONNECTIONS,
                        pids=server.pids,
                    )
                )
            if "wrk-tls" in args.workloads:
                tls_dir = workdir / "nginx-tls"
                tls_dir.mkdir()
                tls_server = stack.enter_context(nginx_server(nginx, tls_dir, cpu))
                workloads.append(
                    Workload(
                        name=f"(d) HTTPS: wrk -t1 -c{WRK_CONNECTIONS} -d{args.seconds}s, "
                        "nginx 1 worker, 100-byte body, both on libssl.so.3",
                        unit="req/s",
                        run=lambda: run_wrk(
                            wrk,
                            f"https://127.0.0.1:{tls_server.tls_port}/body100",
                            args.seconds,
                            cpu,
                        ),
                        port=lambda: tls_server.tls_port,
                        expected_opens=lambda _detail: 2 * WRK_CONNECTIONS,
                        pids=tls_server.pids,
                    )
                )
            if "go-tls" in args.workloads:
                go_dir = workdir / "go-tls"
                go_dir.mkdir()
                go_pair = stack.enter_context(go_tls_server(go_dir, cpu))
                workloads.append(
                    Workload(
                        name=f"(e) Go HTTPS: tlspeer client -> server, keep-alive, "
                        f"100-byte body, {args.seconds}s",
                        unit="req/s",
                        run=lambda: run_go_client(go_pair, args.seconds, cpu),
                        port=lambda: go_pair.port,
                        expected_opens=lambda _detail: 2,
                        pids=go_pair.pids,
                    )
                )
            if "node-tls" in args.workloads:
                node_dir = workdir / "node-tls"
                node_dir.mkdir()
                node_pair = stack.enter_context(node_tls_server(node_dir, cpu))
                workloads.append(
                    Workload(
                        name=f"(f) node HTTPS: node_peer.js client -> server, keep-alive, "
                        f"100-byte body, {args.seconds}s",
                        unit="req/s",
                        run=lambda: run_node_client(node_pair, args.seconds, cpu),
                        port=lambda: node_pair.port,
                        expected_opens=lambda _detail: 2,
                        pids=node_pair.pids,
                    )
                )
            if "java-tls" in args.workloads:
                java_dir = workdir / "java-tls"
                java_dir.mkdir()
                java_pair = stack.enter_context(java_tls_server(java_dir, cpu))
                workloads.append(
                    Workload(
                        name=f"(g) Java HTTPS: HttpClient -> HttpsServer (OpenJDK 17), "
                        f"keep-alive, a new client JVM per run, {args.seconds}s",
                        unit="req/s",
                        run=lambda: run_java_client(java_pair, args.seconds, cpu),
                        port=lambda: java_pair.port,
                        expected_opens=lambda _detail: 2,
                        pids=java_pair.pids,
                        target=0.85,
                    )
                )
            if "loop" in args.workloads:
                loop_port: dict[str, int] = {}

                def loop() -> tuple[float, JsonDict]:
                    result = run_loadgen(
                        [
                            str(loadgen),
                            "conn",
                            "-r",
                            "0",
                            "-d",
                            str(args.seconds),
                            "-b",
                            "100",
                            *pin,
                        ],
                        timeout_s=args.seconds + 60,
                    )
                    loop_port["port"] = int(result["port0"])
                    return float(result["rate"]), result

                workloads.append(
                    Workload(
                        name="(b) connect/send/recv/close loop, new connection each",
                        unit="conn/s",
                        run=loop,
                        port=lambda: loop_port.get("port"),
                        expected_opens=lambda detail: 2 * int(detail["ok"]),
                    )
                )
            if "syscalls" in args.workloads:

                def null_syscalls() -> tuple[float, JsonDict]:
                    result = run_loadgen(
                        [str(loadgen), "syscalls", "-n", "5000000", "-d", str(args.seconds), *pin],
                        timeout_s=args.seconds + 60,
                    )
                    return float(result["rate"]), result

                workloads.append(
                    Workload(
                        name="(c) getppid() loop, no socket",
                        unit="calls/s",
                        run=null_syscalls,
                        port=lambda: None,
                        expected_opens=lambda _detail: 0,
                    )
                )
            for workload in workloads:
                units[workload.name] = workload.unit
                mine: list[Run] = []
                for pair in range(args.pairs):
                    for with_sensor in (False, True):
                        run = measure(
                            workload,
                            with_sensor=with_sensor,
                            wait_quiet=args.wait_quiet,
                            sensor_cpu=args.sensor_cpu,
                            sensor_args=[*args.sensor_args.split(), *scope_args(args, workload)],
                        )
                        mine.append(run)
                        print(
                            f"{workload.name} pair {pair + 1} "
                            f"{'with' if with_sensor else 'without'}: "
                            f"{fmt(run.throughput)} {workload.unit}"
                            + (f" (drops {run.drop_detail})" if run.with_sensor else ""),
                            flush=True,
                        )
                runs += mine
                summaries.append(summarize(workload, mine))
    except BenchError as exc:
        print(f"slowdown: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(command, facts, args, summaries=summaries, runs=runs, units=units)
    return 0


def scope_args(args: argparse.Namespace, workload: Workload) -> list[str]:
    """--scope server: trace the workload's server process tree only (its first pid)."""
    if args.scope != "server":
        return []
    pids = workload.pids()
    if not pids:
        raise BenchError(f"--scope server: {workload.name} has no server process")
    return ["--pid", str(pids[0])]


def report(
    command: str,
    facts: JsonDict,
    args: argparse.Namespace,
    *,
    summaries: list[Summary],
    runs: list[Run],
    units: dict[str, str],
) -> None:
    print()
    pin = f"workload pinned to CPU {args.cpu}" if args.cpu is not None else "no pinning"
    if args.sensor_cpu is not None:
        pin += f", sensor pinned to CPU {args.sensor_cpu}"
    if args.sensor_args:
        pin += f", sensor args {args.sensor_args!r}"
    print(
        f"## flowtap slowdown ({args.pairs} interleaved pairs per workload, {args.seconds} s "
        f"runs, {pin}; sensor: --include-loopback, "
        f"{'the server process only' if args.scope == 'server' else 'no scope filter'})"
    )
    print()
    print(summary_table(summaries))
    print()
    print("Every run, in order:")
    print()
    print(runs_table(runs, units))
    print()
    print_provenance(facts, command)
    path = write_results(
        "slowdown",
        {
            "command": command,
            "host": facts,
            "args": vars(args),
            "target_ratio": TARGET,
            "summary": [asdict(s) for s in summaries],
            "runs": [asdict(r) for r in runs],
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(main())
