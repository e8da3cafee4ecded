"""The `flowtap` command: `flowtap run` (the default) and `flowtap check`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import IO

from flowtap import __version__, preflight, safefile
from flowtap.config import ConfigError, SensorConfig
from flowtap.httpd.endpoints import start_endpoints
from flowtap.httpd.traffic import TrafficCounter
from flowtap.loader.errors import BpfError
from flowtap.loader.system import require_root
from flowtap.sensor import Sensor
from flowtap.settings import reload, yamlfile
from flowtap.settings.options import OPTIONS, SettingError
from flowtap.settings.qtap import FILE_ONLY
from flowtap.settings.resolve import add_flags, config_file, resolve
from flowtap.sinks.base import Sink, open_private
from flowtap.sinks.child import in_child
from flowtap.sinks.console import ConsoleSink
from flowtap.sinks.jsonl import JsonLinesSink, QtapJsonSink
from flowtap.sinks.pipeline import BatchSink, Pipeline
from flowtap.sinks.rotating import Rotation
from flowtap.store import commands as store_commands
from flowtap.store.db import StoreError

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


def build_parser(*, given_only: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowtap",
        description="Every TCP connection on this host, attributed to its process (eBPF).",
    )
    parser.add_argument("--version", action="version", version=f"flowtap {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="{run,check,validate,reload-config,query,export}"
    )

    run = commands.add_parser("run", help="start the sensor (the default command)")
    add_run_arguments(run, given_only=given_only)
    check = commands.add_parser("check", help="report the kernel features flowtap needs")
    check.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    validate = commands.add_parser(
        "validate", help="check a configuration file: exit 0, or print its errors and exit 2"
    )
    validate.add_argument("file", type=Path, metavar="FILE")
    reload_config = commands.add_parser(
        "reload-config", help="make a running sensor read its configuration file again"
    )
    target = reload_config.add_mutually_exclusive_group()
    target.add_argument("--pid", type=int, help="the sensor's pid")
    target.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/flowtap"),
        help="the running sensor's --state-dir, where it wrote its pid (default /var/lib/flowtap)",
    )
    store_commands.add_commands(commands)
    return parser


def reload_running_sensor(pid: int | None, state_dir: Path) -> int:
    """`flowtap reload-config`: SIGHUP to the sensor; it logs whether the file loaded."""
    try:
        target = pid if pid is not None else reload.sensor_pid(state_dir)
        reload.signal_reload(target)
    except (ValueError, OSError) as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"asked flowtap (pid {target}) to reload its configuration; its log says the outcome")
    return EXIT_OK


def validate_file(path: Path) -> int:
    """`flowtap validate FILE`: the file's own errors (the running host is not consulted)."""
    try:
        yamlfile.load(path)
    except SettingError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: ok")
    return EXIT_OK


def add_run_arguments(run: argparse.ArgumentParser, *, given_only: bool = False) -> None:
    """The flags come from the one declaration of every setting (flowtap.settings)."""
    add_flags(run, given_only=given_only)


def make_sink(args: argparse.Namespace | Mapping[str, object]) -> Sink:
    settings = args if isinstance(args, Mapping) else vars(args)
    output_file = settings["output_file"]
    output = settings["output"]
    color_mode = settings["color"]
    max_bytes = settings.get("output_max_bytes", 0)
    keep = settings.get("output_keep", 5)
    assert isinstance(max_bytes, int) and isinstance(keep, int)
    if max_bytes < 0 or keep < 0:
        raise ValueError("--output-max-bytes and --output-keep are 0 or more")
    if max_bytes and output_file is None:
        raise ValueError("--output-max-bytes rotates --output-file: give --output-file too")
    stream: IO[str] = sys.stdout
    owned = False
    rotation = None
    if output_file is not None:
        stream = open_private(str(output_file))
        owned = True
        if max_bytes:
            rotation = Rotation(Path(str(output_file)), stream, max_bytes=max_bytes, keep=keep)
    if output == "json":
        if settings.get("output_format", "flowtap") == "qtap":
            return QtapJsonSink(stream, owned=owned, rotation=rotation)
        return JsonLinesSink(stream, owned=owned, rotation=rotation)
    color = color_mode == "always" or (color_mode == "auto" and not owned and stream.isatty())
    return ConsoleSink(stream, color=color, owned=owned, rotation=rotation)


def make_pipeline(settings: Mapping[str, object]) -> Pipeline:
    """Every output of the run, each behind its own bounded queue (sinks/pipeline.py)."""
    name = "file" if settings["output_file"] is not None else "stdout"
    capacity = settings["sink_queue"]
    assert isinstance(capacity, int)
    sinks: list[tuple[str, Sink | BatchSink]] = [(name, make_sink(settings))]
    # The store and otel sinks do Python work per record: each runs in a child process
    # (sinks/child.py), so it does not take the GIL from the consumer.
    if settings["store"] is not None:
        keys = ("store", "store_max_age", "store_max_bytes")
        store = {key: settings[key] for key in keys}
        sinks.append(
            (
                "store",
                in_child("store", "flowtap.store.sink", "store_sink", store, capacity=capacity),
            )
        )
    if settings["otel_endpoint"] is not None:
        sinks.append(("otel", otel_sink(settings, capacity)))
    return Pipeline(sinks, capacity=capacity)


def otel_sink(settings: Mapping[str, object], capacity: int) -> BatchSink:
    """The otel event store from its settings (flags, environment, Qtap's file), in its
    own process."""
    # Only runs that send to a collector pay for importing the SDK and gRPC (~0.15 s).
    from flowtap.sinks.otel import OtelSettings, parse_headers  # noqa: PLC0415

    headers = settings["otel_headers"]
    assert isinstance(headers, tuple | list)
    protocol = settings["otel_protocol"]
    assert protocol in ("grpc", "http")
    ca_file = settings["otel_ca_file"]
    return in_child(
        "otel",
        "flowtap.sinks.otel",
        "OtelSink",
        OtelSettings(
            endpoint=str(settings["otel_endpoint"]),
            protocol=protocol,
            headers=parse_headers([str(item) for item in headers]),
            service_name=str(settings["otel_service_name"]),
            environment=str(settings["otel_environment"]),
            insecure=bool(settings["otel_insecure"]),
            ca_file=None if ca_file is None else str(ca_file),
            format="qtap" if settings.get("otel_format") == "qtap" else "flowtap",
        ),
        capacity=capacity,
    )


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> SensorConfig:
    """Defaults < environment < flags given (flowtap.settings.resolve)."""
    values, origins = resolve(args, os.environ if environ is None else environ)
    fields = {option.name: values[option.name] for option in OPTIONS if option.in_config}
    for name in FILE_ONLY:
        if name in values:
            fields[name] = values[name]
    return SensorConfig(**fields, origins=origins)


def run(args: argparse.Namespace) -> int:
    try:
        values, origins = resolve(args, os.environ)
    except SettingError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if values["verbose"] else logging.INFO,
        format="flowtap: %(message)s",
        stream=sys.stderr,
    )
    # -v is for the sensor's own messages; hpack logs every header it decodes.
    logging.getLogger("hpack").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
        config.validate()
    except (ConfigError, SettingError) as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    config_path = config_file(args, os.environ)
    watcher: reload.ConfigWatcher[SensorConfig] | None = None
    if config_path is not None:

        def load() -> SensorConfig:
            new = config_from_args(args)
            new.validate()
            return new

        watcher = reload.ConfigWatcher(config_path, load)

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        if watcher is not None:
            watcher.request()
        else:  # SIGHUP's default would end the sensor
            log.info("SIGHUP: no configuration file (--config) to reload")

    signal.signal(signal.SIGHUP, on_hangup)
    try:
        require_root()  # before the output file is created
        sink = make_pipeline(values)
    except BpfError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, ValueError) as exc:  # ValueError: an otel setting
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"flowtap: cannot open the output file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    traffic = TrafficCounter()
    if values["httpd_listen"] != "off":
        sink.observe(traffic.count)
    sensor = Sensor(config, sink)
    sensor.config_watcher = watcher
    try:
        endpoints = start_endpoints(sensor, traffic, values["httpd_listen"], origins)
    except OSError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def finish() -> None:
        # The endpoints first: they read the kernel's maps, which stop() closes.
        if endpoints is not None:
            endpoints.stop()
        sensor.stop()

    pid_file = config.egress_state_dir / reload.PID_FILE
    pid_written = False
    try:
        sensor.start()
        pid_written = _write_pid_file(config.egress_state_dir, pid_file)
        sensor.run(stop)
    except BpfError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        code = EXIT_USAGE if exc.errno_value is None else EXIT_FAILED
    except BaseException:
        finish()
        _remove_pid_file(pid_file, pid_written)
        raise
    else:
        code = EXIT_OK
    finish()
    # After finish(): the proxy's connections are closed, so descriptors are free again.
    _remove_pid_file(pid_file, pid_written)
    return code


def _write_pid_file(state_dir: Path, pid_file: Path) -> bool:
    """For `flowtap reload-config`: in the root-only state directory, so it can be trusted."""
    try:
        safefile.private_directory(state_dir)
        safefile.replace(pid_file, f"{os.getpid()}\n".encode())
    except OSError as exc:
        log.warning("cannot write %s (`flowtap reload-config` needs --pid): %s", pid_file, exc)
        return False
    return True


def _remove_pid_file(pid_file: Path, written: bool) -> None:
    """Only the pid file this sensor wrote (another sensor's, in a shared --state-dir, stays)."""
    if not written:
        return
    try:
        if pid_file.read_text().strip() == str(os.getpid()):
            safefile.remove(pid_file)
    except OSError as exc:  # a stale pid file is harmless: reload-config checks the process
        log.warning("cannot remove %s: %s", pid_file, exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(given_only=True)
    # `flowtap --pid 1` means `flowtap run --pid 1`: run is the default command.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    args._given_only = True
    if args.command == "validate":
        return validate_file(args.file)
    if args.command == "check":
        return preflight.main(["--color", args.color])
    if args.command == "reload-config":
        return reload_running_sensor(args.pid, args.state_dir)
    if args.command in ("query", "export"):
        return store_commands.main(args)
    return run(args)
