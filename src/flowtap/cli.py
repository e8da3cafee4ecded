"""The `flowtap` command: `flowtap run` (the default) and `flowtap check`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import IO

from flowtap import __version__, preflight
from flowtap.config import ConfigError, SensorConfig
from flowtap.loader.errors import BpfError
from flowtap.loader.features import FEATURES
from flowtap.loader.system import require_root
from flowtap.records.http import CAPTURE_LEVELS
from flowtap.sensor import Sensor
from flowtap.sinks.base import Sink, open_private
from flowtap.sinks.console import ConsoleSink
from flowtap.sinks.jsonl import JsonLinesSink
from flowtap.tls import plugins

log = logging.getLogger("flowtap")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowtap",
        description="Every TCP connection on this host, attributed to its process (eBPF).",
    )
    parser.add_argument("--version", action="version", version=f"flowtap {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{run,check}")

    run = commands.add_parser("run", help="start the sensor (the default command)")
    add_run_arguments(run)
    check = commands.add_parser("check", help="report the kernel features flowtap needs")
    check.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return parser


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    filters = run.add_argument_group("what to trace (filters combine: all must match)")
    filters.add_argument(
        "--pid",
        type=_positive_int,
        action="append",
        default=[],
        help="trace this process and its descendants (repeatable)",
    )
    filters.add_argument("--cgroup", type=Path, help="trace processes in this cgroup v2 directory")
    filters.add_argument(
        "--exe",
        action="append",
        default=[],
        metavar="PATTERN",
        help="glob on the executable path, its file name or the process name (repeatable)",
    )
    filters.add_argument("--direction", choices=("egress", "ingress", "all"), default="all")
    filters.add_argument(
        "--include-loopback",
        action="store_true",
        help="also report connections to 127.0.0.0/8 and ::1 (ignored by default)",
    )
    payload = run.add_argument_group("payloads (HTTP transactions)")
    payload.add_argument(
        "--capture-level",
        choices=CAPTURE_LEVELS,
        default="summary",
        help="none, summary (method, URL, status), headers, or full (bodies too)",
    )
    payload.add_argument(
        "--max-body-bytes",
        type=int,
        default=64 << 10,
        metavar="N",
        help="body bytes kept per message at --capture-level full (default 65536)",
    )
    payload.add_argument(
        "--tls-attach",
        choices=("file", "process"),
        default="file",
        help="TLS probes once per library or Go executable for every process (file, the "
        "default), or per --pid process so that untraced programs pay nothing (process: "
        "best for a few long-lived processes; each attach costs milliseconds)",
    )
    payload.add_argument(
        "--tls-placement",
        choices=("auto", "exported"),
        default="auto",
        help="auto: OpenSSL probes where the library's code shows a cheaper equivalent "
        "point (docs/tls.md); exported: always at SSL_read/SSL_write and their _ex variants",
    )
    payload.add_argument(
        "--tls-probes",
        default=os.environ.get("QPOINT_TLS_PROBES", ",".join(plugins.NAMES)),
        metavar="LIST",
        help="TLS libraries to probe, comma-separated (as Qtap's flag): "
        f"{', '.join(plugins.NAMES)} (default: all; also $QPOINT_TLS_PROBES)",
    )
    payload.add_argument(
        "--exec-gate",
        choices=("on", "off"),
        default="on",
        help="hold each exec of a never-seen file until it is classified and its TLS "
        "probes are attached (fanotify; on where the kernel supports it: docs/program-start.md)",
    )
    payload.add_argument(
        "--exec-hold-ms",
        type=_positive_int,
        default=300,
        metavar="MS",
        help="the longest an exec is held; past it the exec goes on and probes are "
        "attached in the background (default 300)",
    )
    payload.add_argument(
        "--exec-gate-path",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="hold execs from the filesystems of these paths only (repeatable; default: "
        "every mounted filesystem that can hold programs)",
    )
    # Test-only (tests/e2e/test_exec_gate.py): makes every classification this slow.
    payload.add_argument("--exec-gate-test-delay-ms", type=int, default=0, help=argparse.SUPPRESS)
    payload.add_argument(
        "--no-redaction",
        action="store_true",
        help="show credentials (Authorization, Cookie, API keys) instead of [REDACTED]",
    )
    egress = run.add_argument_group(
        "egress controller (QPOINT_STRATEGY=forward processes through a local proxy)"
    )
    egress.add_argument(
        "--egress",
        action="store_true",
        help="run the proxy and redirect forward processes' outbound TCP to it",
    )
    egress.add_argument(
        "--egress-cgroup",
        type=Path,
        help="cgroup v2 directory whose processes can be redirected (default: the root)",
    )
    egress.add_argument(
        "--trust-store",
        type=Path,
        default=Path(os.environ["TRUST_STORE"]) if os.environ.get("TRUST_STORE") else None,
        help="directory where the proxy's CA certificate is written for clients to trust "
        "(default: $TRUST_STORE)",
    )
    egress.add_argument(
        "--proxy-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the explicit proxy on 127.0.0.1 (HTTP_PROXY/HTTPS_PROXY); 0: any free "
        "port, printed at start",
    )
    egress.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/flowtap"),
        help="where the proxy keeps its CA and the exec gate its file classes (created at "
        "first start, files mode 0600)",
    )
    egress.add_argument(
        "--proxy-header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a client must send a whole request head within this, or gets 408 (default 10)",
    )
    egress.add_argument(
        "--upstream-ca-file",
        type=Path,
        help="PEM roots trusted for upstream servers besides the system's",
    )
    run.add_argument(
        "--avoid-kernel-features",
        default=os.environ.get("FLOWTAP_AVOID_KERNEL_FEATURES", ""),
        metavar="LIST",
        help="kernel features not to use even where present, comma-separated (runs the "
        f"fallbacks older kernels get; `flowtap check` shows the result): {', '.join(FEATURES)}",
    )
    out = run.add_argument_group("output")
    out.add_argument("--output", choices=("console", "json"), default="console")
    out.add_argument("--output-file", type=Path, help="append records here (mode 0600)")
    out.add_argument(
        "--ready-file", type=Path, help="write this file once every program is attached"
    )
    out.add_argument(
        "--stats-file", type=Path, help="write counters and drops here as JSON at exit"
    )
    out.add_argument(
        "--stats-interval", type=float, default=30.0, metavar="SECONDS", help="drop report period"
    )
    out.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    out.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def make_sink(args: argparse.Namespace) -> Sink:
    stream: IO[str] = sys.stdout
    owned = False
    if args.output_file is not None:
        stream = open_private(str(args.output_file))
        owned = True
    if args.output == "json":
        return JsonLinesSink(stream, owned=owned)
    color = args.color == "always" or (args.color == "auto" and not owned and stream.isatty())
    return ConsoleSink(stream, color=color, owned=owned)


def config_from_args(args: argparse.Namespace) -> SensorConfig:
    return SensorConfig(
        pids=tuple(args.pid),
        cgroup=args.cgroup,
        exe_patterns=tuple(args.exe),
        direction=args.direction,
        include_loopback=args.include_loopback,
        output=args.output,
        output_file=args.output_file,
        ready_file=args.ready_file,
        stats_interval_s=args.stats_interval,
        stats_file=args.stats_file,
        capture_level=args.capture_level,
        max_body_bytes=args.max_body_bytes,
        redact=not args.no_redaction,
        tls_attach=args.tls_attach,
        tls_placement=args.tls_placement,
        tls_probes=tuple(name.strip() for name in args.tls_probes.split(",") if name.strip()),
        egress=args.egress,
        egress_cgroup=args.egress_cgroup,
        trust_store=args.trust_store,
        proxy_port=args.proxy_port,
        egress_state_dir=args.state_dir,
        upstream_ca_file=args.upstream_ca_file,
        proxy_header_timeout_s=args.proxy_header_timeout,
        avoid_kernel_features=tuple(
            name.strip() for name in args.avoid_kernel_features.split(",") if name.strip()
        ),
        exec_gate=args.exec_gate == "on",
        exec_hold_ms=args.exec_hold_ms,
        exec_gate_paths=tuple(args.exec_gate_path),
        exec_gate_test_delay_ms=args.exec_gate_test_delay_ms,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="flowtap: %(message)s",
        stream=sys.stderr,
    )
    # -v is for the sensor's own messages; hpack logs every header it decodes.
    logging.getLogger("hpack").setLevel(logging.WARNING)
    config = config_from_args(args)
    try:
        config.validate()
    except ConfigError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        require_root()  # before the output file is created
        sink = make_sink(args)
    except BpfError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"flowtap: cannot open the output file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sensor = Sensor(config, sink)
    try:
        sensor.start()
        sensor.run(stop)
    except BpfError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        sensor.stop()
        return EXIT_USAGE if exc.errno_value is None else EXIT_FAILED
    except BaseException:
        sensor.stop()
        raise
    sensor.stop()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # `flowtap --pid 1` means `flowtap run --pid 1`: run is the default command.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    if args.command == "check":
        return preflight.main(["--color", args.color])
    return run(args)
