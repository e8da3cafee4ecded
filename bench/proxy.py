"""Egress proxy benchmark: HTTPS keep-alive through flowtap's proxy vs direct vs mitmproxy.

One run measures, on the same workload (nginx with one worker serving HTTP/1.1 over TLS on
127.0.0.1, `wrk` as the client, small and 64 KiB response bodies):

* direct: wrk -> nginx;
* flowtap: wrk -> flowtap's transparent listener (original destination injected: nginx)
  -> TLS terminated with flowtap's CA, re-encrypted to nginx, every request parsed into
  transactions as the sensor would;
* mitmproxy: wrk -> mitmdump in reverse mode (its way of proxying one fixed destination)
  -> nginx. mitmproxy is installed from PyPI into build/mitmproxy-venv (its pins would clash
  with ours).

Throughput comes from a run with several connections; added latency (p50/p99 minus direct)
from a run with a single connection, so that queueing does not hide the proxy's own cost.
Usage (as root, from the repository root): .venv/bin/python -m bench.proxy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import REPO, RESULTS, BenchError, command_line

MITM_VERSION = "11.0.2"
MITM_VENV = REPO / "build" / "mitmproxy-venv"
SMALL_BODY = b"ok\n"
LARGE_SIZE = 64 << 10


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def _process(args: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# -- pieces ---------------------------------------------------------------------------


def make_pki(work: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, cert.pem, key.pem) for nginx: a leaf for localhost from a throwaway CA."""
    from flowtap.proxy.ca import CertificateAuthority  # noqa: PLC0415  (after arg parsing)

    ca = CertificateAuthority.load_or_create(work / "upstream-ca")
    leaf = ca.leaf("localhost")
    paths = (work / "upstream-ca.pem", work / "nginx.crt", work / "nginx.key")
    paths[0].write_bytes(ca.cert_pem)
    paths[1].write_bytes(leaf.cert_pem)
    paths[2].write_bytes(leaf.key_pem)
    os.chmod(paths[2], 0o600)
    return paths


def nginx_conf(work: Path, port: int, cert: Path, key: Path) -> Path:
    www = work / "www"
    www.mkdir()
    (www / "small").write_bytes(SMALL_BODY)
    (www / "large").write_bytes(bytes(LARGE_SIZE))
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
master_process off;
worker_processes 1;
user root;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {www};
    }}
}}
"""
    )
    return conf


def ensure_mitmproxy() -> Path:
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    if not mitmdump.exists():
        print(f"installing mitmproxy {MITM_VERSION} into {MITM_VENV}", file=sys.stderr)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(MITM_VENV)], check=True)
        subprocess.run(
            [str(MITM_VENV / "bin" / "pip"), "install", "-q", f"mitmproxy=={MITM_VERSION}"],
            check=True,
            timeout=900,
        )
    return mitmdump


def wrk(url: str, connections: int, seconds: int) -> WrkResult:
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed (Debian: apt-get install wrk)")
    done = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed on {url}: {done.stderr.strip()}")
    out = done.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = sum(
        int(n)
        for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out)
        + re.findall(r"Non-2xx or 3xx responses: (\d+)", out)
    )
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    if rate is None or total is None or set(percentiles) != {"50", "99"}:
        raise BenchError(f"cannot read wrk's output:\n{out}")
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        p50_ms=_ms(percentiles["50"]),
        p99_ms=_ms(percentiles["99"]),
        requests=int(total.group(1)),
        errors=errors,
    )


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


# -- the flowtap proxy, in its own process ----------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """Run flowtap's proxy toward one fixed destination until SIGTERM (bench child)."""
    from flowtap.proxy import CertificateAuthority, EgressProxy, ProxyConfig  # noqa: PLC0415
    from flowtap.records.http import HttpRecordOptions  # noqa: PLC0415

    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415

        uvloop.install()
    destination = ("127.0.0.1", args.upstream_port)
    transactions = 0

    def on_transaction(*_: object) -> None:
        nonlocal transactions
        transactions += 1

    async def main() -> None:
        ca = CertificateAuthority.load_or_create(args.state)
        config = ProxyConfig(
            transparent_port=args.port,
            host6=None,
            explicit_port=None,
            upstream_ca_file=args.upstream_ca,
            http=HttpRecordOptions(level="summary"),
        )
        proxy = EgressProxy(
            config, ca, on_transaction=on_transaction, original_destination=lambda _: destination
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with proxy:
            await stop.wait()
        print(json.dumps({"transactions": transactions, **proxy.counters()}), file=sys.stderr)

    asyncio.run(main())
    return 0


# -- the run --------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> int:
    if shutil.which("nginx") is None:
        raise BenchError("nginx is not installed (Debian: apt-get install nginx-light)")
    mitmdump = ensure_mitmproxy()
    work = Path(tempfile.mkdtemp(prefix="flowtap-proxy-bench-"))
    try:
        ca_pem, cert, key = make_pki(work)
        nginx_port, flowtap_port, mitm_port = _free_port(), _free_port(), _free_port()
        conf = nginx_conf(work, nginx_port, cert, key)
        results: dict[str, dict[str, dict[str, WrkResult]]] = {}
        with contextlib.ExitStack() as stack:
            nginx = stack.enter_context(_process(["nginx", "-c", str(conf), "-p", str(work)]))
            _wait_port(nginx_port, nginx)
            flowtap = stack.enter_context(
                _process(
                    [
                        sys.executable,
                        "-m",
                        "bench.proxy",
                        "serve",
                        "--upstream-port",
                        str(nginx_port),
                        "--port",
                        str(flowtap_port),
                        "--state",
                        str(work / "flowtap-state"),
                        "--upstream-ca",
                        str(ca_pem),
                        "--loop",
                        args.loop,
                    ],
                    cwd=REPO,
                )
            )
            _wait_port(flowtap_port, flowtap)
            mitm = stack.enter_context(
                _process(
                    [
                        str(mitmdump),
                        "-q",
                        "--mode",
                        f"reverse:https://localhost:{nginx_port}",
                        "--listen-host",
                        "127.0.0.1",
                        "--listen-port",
                        str(mitm_port),
                        "--set",
                        f"ssl_verify_upstream_trusted_ca={ca_pem}",
                        "--set",
                        f"confdir={work / 'mitmproxy'}",
                        "--set",
                        "flow_detail=0",
                    ]
                )
            )
            _wait_port(mitm_port, mitm)
            targets = {"direct": nginx_port, "flowtap": flowtap_port, "mitmproxy": mitm_port}
            for body in ("small", "large"):
                for name, port in targets.items():
                    url = f"https://localhost:{port}/{body}"
                    wrk(url, 1, 1)  # warm up: handshakes, leaf signing, caches
                    rate = wrk(url, args.connections, args.seconds)
                    single = wrk(url, 1, args.seconds)
                    results.setdefault(body, {})[name] = {"throughput": rate, "latency": single}
                    print(
                        f"{body:5} {name:9} {rate.requests_per_s:9.0f} req/s "
                        f"(c={args.connections}, errors {rate.errors})  "
                        f"c=1: p50 {single.p50_ms:.3f} ms  p99 {single.p99_ms:.3f} ms",
                        flush=True,
                    )
        report(results, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, dict[str, dict[str, WrkResult]]], args: argparse.Namespace) -> None:
    summary: dict[str, object] = {}
    print()
    for body, by_target in results.items():
        direct = by_target["direct"]
        flowtap = by_target["flowtap"]
        mitm = by_target["mitmproxy"]
        ratio = flowtap["throughput"].requests_per_s / max(mitm["throughput"].requests_per_s, 1e-9)
        keep = flowtap["throughput"].requests_per_s / direct["throughput"].requests_per_s
        line = {
            "flowtap_vs_mitmproxy_rps": round(ratio, 2),
            "flowtap_vs_direct_rps": round(keep, 3),
            "mitmproxy_vs_direct_rps": round(
                mitm["throughput"].requests_per_s / direct["throughput"].requests_per_s, 3
            ),
            "flowtap_added_p50_ms": round(flowtap["latency"].p50_ms - direct["latency"].p50_ms, 3),
            "flowtap_added_p99_ms": round(flowtap["latency"].p99_ms - direct["latency"].p99_ms, 3),
            "mitmproxy_added_p50_ms": round(mitm["latency"].p50_ms - direct["latency"].p50_ms, 3),
            "mitmproxy_added_p99_ms": round(mitm["latency"].p99_ms - direct["latency"].p99_ms, 3),
        }
        summary[body] = line
        print(
            f"{body}: flowtap/mitmproxy req/s x{line['flowtap_vs_mitmproxy_rps']}, "
            f"flowtap/direct {line['flowtap_vs_direct_rps']}, "
            f"added p50 {line['flowtap_added_p50_ms']} ms (mitmproxy "
            f"{line['mitmproxy_added_p50_ms']}), added p99 {line['flowtap_added_p99_ms']} ms "
            f"(mitmproxy {line['mitmproxy_added_p99_ms']})"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"proxy-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "command": command_line("bench.proxy"),
                "loop": args.loop,
                "connections": args.connections,
                "seconds": args.seconds,
                "cpus": os.cpu_count(),
                "results": {
                    body: {name: {k: asdict(v) for k, v in r.items()} for name, r in t.items()}
                    for body, t in results.items()
                },
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"\nresults: {path}\ncommand: {command_line('bench.proxy')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("serve", help="(internal) run flowtap's proxy for the benchmark")
    child.add_argument("--upstream-port", type=int, required=True)
    child.add_argument("--port", type=int, required=True)
    child.add_argument("--state", required=True)
    child.add_argument("--upstream-ca", required=True)
    child.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--seconds", type=int, default=8, help="per measurement (default 8)")
    parser.add_argument("--connections", type=int, default=16, help="for throughput (16)")
    parser.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="uvloop", help="flowtap's event loop"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        return measure(args)
    except BenchError as exc:
        print(f"bench.proxy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
