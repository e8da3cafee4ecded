"""Every setting of `flowtap run`, declared once: name, type, default, flag, environment
variable, YAML path and help. The command-line flags, the environment variables and the
`flowtap:` section of the YAML file are all derived from this table (modelled on mitmproxy's
optmanager: one declaration, many front ends)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowtap.httpd.listen import parse_listen
from flowtap.loader.features import FEATURES
from flowtap.records.http import CAPTURE_LEVELS
from flowtap.tls import plugins

# Kinds of value: how a string (flag, environment) or a YAML value becomes the setting.
#   bool   flag without argument (store_true, or store_false with `negate`)
#   int, float, path, str   one value; `choices` restricts str
#   ints, strs, paths       repeatable flag (append), a YAML list, comma-separated in env
#   csv    a comma-separated string flag, a YAML list or string, stored as a tuple
#   onoff  a flag taking on|off, a YAML boolean
#   listen HOST:PORT or off (flowtap.httpd.listen), kept as the text given
Kind = str


class SettingError(ValueError):
    """A value that does not fit its setting; the message names the setting and its source."""


@dataclass(frozen=True)
class Option:
    name: str  # the SensorConfig field (or a command-line-only setting)
    kind: Kind
    default: Any
    help: str
    flag: str | None = None  # None: not on the command line
    env: str | None = None  # None: FLOWTAP_<NAME>
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    group: str = "run"
    negate: bool = False  # a bool flag that sets the setting to False (--no-redaction)
    positive: bool = False  # ints: must be above zero
    in_config: bool = True  # a SensorConfig field (else read by the command only)
    hidden: bool = False  # test-only: not in --help

    @property
    def env_name(self) -> str:
        return self.env or f"FLOWTAP_{self.name.upper()}"

    @property
    def yaml_path(self) -> str:
        return f"flowtap.{self.name}"

    @property
    def dest(self) -> str:
        """The argparse attribute (the flag's name, as the command line always had it)."""
        if self.flag is None:
            return self.name
        return self.flag.lstrip("-").replace("-", "_")


_F = "what to trace (filters combine: all must match)"
_P = "payloads (HTTP transactions)"
_E = "egress controller (QPOINT_STRATEGY=forward processes through a local proxy)"
_O = "output"

OPTIONS: tuple[Option, ...] = (
    Option(
        "config_file",
        "path",
        None,
        "YAML configuration whose `flowtap:` section sets any of these (docs/configuration.md)",
        flag="--config",
        env="QPOINT_CONFIG",
        metavar="FILE",
        in_config=False,
    ),
    Option(
        "pids",
        "ints",
        (),
        "trace this process and its descendants (repeatable)",
        flag="--pid",
        positive=True,
        group=_F,
    ),
    Option(
        "cgroup",
        "path",
        None,
        "trace processes in this cgroup v2 directory",
        flag="--cgroup",
        group=_F,
    ),
    Option(
        "exe_patterns",
        "strs",
        (),
        "glob on the executable path, its file name or the process name (repeatable)",
        flag="--exe",
        metavar="PATTERN",
        group=_F,
    ),
    Option(
        "direction",
        "str",
        "all",
        "which connections: egress, ingress or all; egress-internal or egress-external: "
        "outbound to private, loopback, link-local and CGNAT peers only, or to the others",
        flag="--direction",
        choices=("egress", "ingress", "all", "egress-internal", "egress-external"),
        group=_F,
    ),
    Option(
        "include_loopback",
        "bool",
        False,
        "also report connections to 127.0.0.0/8 and ::1 (ignored by default)",
        flag="--include-loopback",
        group=_F,
    ),
    Option(
        "capture_level",
        "str",
        "summary",
        "none, summary (method, URL, status), headers, or full (bodies too)",
        flag="--capture-level",
        choices=CAPTURE_LEVELS,
        group=_P,
    ),
    Option(
        "max_body_bytes",
        "int",
        64 << 10,
        "body bytes kept per message at --capture-level full (default 65536)",
        flag="--max-body-bytes",
        metavar="N",
        group=_P,
    ),
    Option(
        "tls_attach",
        "str",
        "file",
        "TLS probes once per library or Go executable for "
        "every process (file, the default), or per --pid process so that untraced programs "
        "pay nothing (process: best for a few long-lived processes; each attach costs "
        "milliseconds)",
        flag="--tls-attach",
        choices=("file", "process"),
        group=_P,
    ),
    Option(
        "tls_placement",
        "str",
        "auto",
        "auto: OpenSSL probes where the library's code "
        "shows a cheaper equivalent point (docs/tls.md); exported: always at "
        "SSL_read/SSL_write and their _ex variants",
        flag="--tls-placement",
        choices=("auto", "exported"),
        group=_P,
    ),
    Option(
        "tls_probes",
        "csv",
        plugins.NAMES,
        "TLS libraries to probe, comma-separated (as "
        f"Qtap's flag): {', '.join(plugins.NAMES)} (default: all; also $QPOINT_TLS_PROBES)",
        flag="--tls-probes",
        env="QPOINT_TLS_PROBES",
        metavar="LIST",
        group=_P,
    ),
    Option(
        "exec_gate",
        "onoff",
        True,
        "hold each exec of a never-seen file until it is "
        "classified and its TLS probes are attached (fanotify; on where the kernel supports "
        "it: docs/program-start.md)",
        flag="--exec-gate",
        group=_P,
    ),
    Option(
        "exec_hold_ms",
        "int",
        300,
        "the longest an exec is held; past it the exec goes on "
        "and probes are attached in the background (default 300)",
        flag="--exec-hold-ms",
        metavar="MS",
        positive=True,
        group=_P,
    ),
    Option(
        "exec_gate_paths",
        "paths",
        (),
        "hold execs from the filesystems of these paths "
        "only (repeatable; default: every mounted filesystem that can hold programs)",
        flag="--exec-gate-path",
        metavar="PATH",
        group=_P,
    ),
    Option(
        "exec_gate_test_delay_ms",
        "int",
        0,
        "test-only: every classification this slow",
        flag="--exec-gate-test-delay-ms",
        hidden=True,
        group=_P,
    ),
    Option(
        "redact",
        "bool",
        True,
        "show credentials (Authorization, Cookie, API keys) instead of [REDACTED]",
        flag="--no-redaction",
        negate=True,
        group=_P,
    ),
    Option(
        "egress",
        "bool",
        False,
        "run the proxy and redirect forward processes' outbound TCP to it",
        flag="--egress",
        group=_E,
    ),
    Option(
        "egress_cgroup",
        "path",
        None,
        "cgroup v2 directory whose processes can be redirected (default: the root)",
        flag="--egress-cgroup",
        group=_E,
    ),
    Option(
        "trust_store",
        "path",
        None,
        "directory where the proxy's CA certificate is "
        "written for clients to trust (default: $TRUST_STORE)",
        flag="--trust-store",
        env="TRUST_STORE",
        group=_E,
    ),
    Option(
        "proxy_port",
        "int",
        0,
        "port of the explicit proxy on 127.0.0.1 "
        "(HTTP_PROXY/HTTPS_PROXY); 0: any free port, printed at start",
        flag="--proxy-port",
        metavar="PORT",
        group=_E,
    ),
    Option(
        "egress_state_dir",
        "path",
        Path("/var/lib/flowtap"),
        "where the proxy keeps its "
        "CA and the exec gate its file classes (created at first start, files mode 0600)",
        flag="--state-dir",
        env="FLOWTAP_STATE_DIR",
        group=_E,
    ),
    Option(
        "proxy_header_timeout_s",
        "float",
        10.0,
        "a client must send a whole request head within this, or gets 408 (default 10)",
        flag="--proxy-header-timeout",
        env="FLOWTAP_PROXY_HEADER_TIMEOUT",
        metavar="SECONDS",
        group=_E,
    ),
    Option(
        "upstream_ca_file",
        "path",
        None,
        "PEM roots trusted for upstream servers besides the system's",
        flag="--upstream-ca-file",
        group=_E,
    ),
    Option(
        "avoid_kernel_features",
        "csv",
        (),
        "kernel features not to use even where "
        "present, comma-separated (runs the fallbacks older kernels get; `flowtap check` "
        f"shows the result): {', '.join(FEATURES)}",
        flag="--avoid-kernel-features",
        metavar="LIST",
    ),
    Option(
        "ring_buffer_bytes", "int", 8 << 20, "kernel-to-sensor ring buffer size (a power of two)"
    ),
    Option("max_connections", "int", 65536, "connections tracked at once in the kernel"),
    Option(
        "output",
        "str",
        "console",
        "record format",
        flag="--output",
        choices=("console", "json"),
        group=_O,
    ),
    Option(
        "output_file",
        "path",
        None,
        "append records here (mode 0600)",
        flag="--output-file",
        group=_O,
    ),
    # Rotation of --output-file (sinks/rotating.py): read by the command only.
    Option(
        "output_max_bytes",
        "int",
        0,
        "rotate --output-file before a record would take it past this size: it becomes "
        "FILE.1 (FILE.1 becomes FILE.2 ...); a record is never split (0: no rotation)",
        flag="--output-max-bytes",
        metavar="BYTES",
        in_config=False,
        group=_O,
    ),
    Option(
        "output_keep",
        "int",
        5,
        "rotated files kept beside --output-file (FILE.1 .. FILE.N; the oldest is removed)",
        flag="--output-keep",
        metavar="N",
        in_config=False,
        group=_O,
    ),
    Option(
        "output_format",
        "str",
        "flowtap",
        "--output json's field names: flowtap's, or Qtap's (its HTTP transaction and "
        "connection events; docs/outputs.md)",
        flag="--output-format",
        choices=("flowtap", "qtap"),
        in_config=False,
        group=_O,
    ),
    Option(
        "sink_queue",
        "int",
        10_000,
        "records each output may have waiting; beyond, its records are counted as "
        "sink_dropped (lost) so a slow output never stalls the sensor",
        flag="--sink-queue",
        metavar="N",
        group=_O,
        positive=True,
    ),
    Option(
        "store",
        "path",
        None,
        "also keep connections and HTTP transactions in this SQLite file (owner-only), "
        "for `flowtap query` and `flowtap export` (docs/outputs.md)",
        flag="--store",
        metavar="PATH",
        group=_O,
    ),
    Option(
        "store_max_age",
        "float",
        0.0,
        "delete stored records older than this many seconds (0: keep them)",
        flag="--store-max-age",
        metavar="SECONDS",
        group=_O,
    ),
    Option(
        "store_max_bytes",
        "int",
        0,
        "delete the oldest stored records while the rows take more than this (0: no limit)",
        flag="--store-max-bytes",
        metavar="BYTES",
        group=_O,
    ),
    # The otel event store (sinks/otel.py): read by the command only.
    Option(
        "otel_endpoint",
        "str",
        None,
        "also send each record as an OpenTelemetry log record to this OTLP collector "
        "(host:port for grpc, a URL for http; docs/outputs.md)",
        flag="--otel-endpoint",
        metavar="URL",
        in_config=False,
        group=_O,
    ),
    Option(
        "otel_protocol",
        "str",
        "grpc",
        "OTLP transport",
        flag="--otel-protocol",
        choices=("grpc", "http"),
        in_config=False,
        group=_O,
    ),
    Option(
        "otel_headers",
        "strs",
        (),
        "a header of every OTLP request, KEY=VALUE (repeatable; values are never logged)",
        flag="--otel-header",
        metavar="KEY=VALUE",
        in_config=False,
        group=_O,
    ),
    Option(
        "otel_service_name",
        "str",
        "flowtap",
        "the service.name resource attribute",
        flag="--otel-service-name",
        in_config=False,
        group=_O,
    ),
    Option(
        "otel_environment",
        "str",
        "",
        "the deployment.environment resource attribute",
        flag="--otel-environment",
        in_config=False,
        group=_O,
    ),
    Option(
        "otel_insecure",
        "bool",
        False,
        "send OTLP without TLS",
        flag="--otel-insecure",
        in_config=False,
        group=_O,
    ),
    Option(
        "otel_ca_file",
        "path",
        None,
        "trust this CA file for the collector's certificate (else the system's roots)",
        flag="--otel-ca-file",
        metavar="FILE",
        in_config=False,
        group=_O,
    ),
    Option(
        "otel_format",
        "str",
        "flowtap",
        "the OTLP log records' attribute names: flowtap's fields, or Qtap's (docs/outputs.md)",
        flag="--otel-format",
        choices=("flowtap", "qtap"),
        in_config=False,
        group=_O,
    ),
    Option(
        "s3_endpoint",
        "str",
        "",
        "object store: at --capture-level full, bodies and headers go to this S3 endpoint "
        "(host:port or URL) as objects named by their sha256; records carry their URLs. "
        "Keys from FLOWTAP_S3_ACCESS_KEY/FLOWTAP_S3_SECRET_KEY or AWS_ACCESS_KEY_ID/"
        "AWS_SECRET_ACCESS_KEY (docs/outputs.md)",
        flag="--s3-endpoint",
        metavar="HOST:PORT",
        group=_O,
    ),
    Option("s3_bucket", "str", "", "object store: the bucket", flag="--s3-bucket", group=_O),
    Option(
        "s3_region", "str", "us-east-1", "object store: the region", flag="--s3-region", group=_O
    ),
    Option(
        "s3_insecure",
        "bool",
        False,
        "object store: plain http to the endpoint (a local S3 server)",
        flag="--s3-insecure",
        group=_O,
    ),
    Option(
        "s3_access_url",
        "str",
        "{endpoint}/{bucket}/{digest}",
        "object store: the URL records carry for an object: {endpoint} {bucket} {digest}, "
        "or Qtap's {{ENDPOINT}} {{BUCKET}} {{DIGEST}}",
        flag="--s3-access-url",
        metavar="TEMPLATE",
        group=_O,
    ),
    Option(
        "ready_file",
        "path",
        None,
        "write this file once every program is attached",
        flag="--ready-file",
        group=_O,
    ),
    Option(
        "stats_file",
        "path",
        None,
        "write counters and drops here as JSON at exit",
        flag="--stats-file",
        group=_O,
    ),
    Option(
        "stats_interval_s",
        "float",
        30.0,
        "drop report period",
        flag="--stats-interval",
        env="FLOWTAP_STATS_INTERVAL",
        metavar="SECONDS",
        group=_O,
    ),
    Option(
        "httpd_listen",
        "listen",
        "127.0.0.1:10001",
        "serve /healthz, /readyz and /metrics on this IP:PORT (Qtap's flag; "
        "docs/endpoints.md), or off",
        flag="--httpd-listen",
        metavar="IP:PORT",
        in_config=False,
        group=_O,
    ),
    Option(
        "color",
        "str",
        "auto",
        "colored console output",
        flag="--color",
        choices=("auto", "always", "never"),
        in_config=False,
        group=_O,
    ),
    Option("verbose", "bool", False, "debug logging", flag="--verbose", in_config=False, group=_O),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _scalar(option: Option, text: str) -> Any:
    """One string (a flag's argument or an environment value) as the option's type."""
    kind = option.kind.rstrip("s") if option.kind in ("ints", "strs", "paths") else option.kind
    if kind == "int":
        try:
            value = int(text.strip())
        except ValueError:
            raise SettingError(f"{text!r} is not a whole number") from None
        if option.positive and value <= 0:
            raise SettingError(f"{value} must be positive")
        return value
    if kind == "float":
        try:
            number = float(text)
        except ValueError:
            raise SettingError(f"{text!r} is not a number") from None
        if not math.isfinite(number):
            raise SettingError(f"{text!r} is not a finite number")
        return number
    if kind == "listen":
        try:
            address = parse_listen(text)
        except ValueError as exc:
            raise SettingError(str(exc)) from None
        return "off" if address is None else text.strip()
    if kind == "path":
        if not text:
            raise SettingError("an empty path")
        return Path(text)
    if kind in ("bool", "onoff"):
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingError(f"{text!r} is not one of true, false, on, off, 1, 0")
    if option.choices is not None and text not in option.choices:
        raise SettingError(f"{text!r} is not one of {', '.join(option.choices)}")
    return text


def parse_text(option: Option, text: str) -> Any:
    """An environment variable's value: lists are comma-separated."""
    if option.kind in ("ints", "strs", "paths", "csv"):
        return tuple(_scalar(option, part.strip()) for part in text.split(",") if part.strip())
    # A negated flag's variable still carries the setting's value: FLOWTAP_REDACT=false.
    return _scalar(option, text)


def parse_yaml(option: Option, value: object) -> Any:
    """A YAML value (already a Python object) as the option's type."""
    if option.kind in ("ints", "strs", "paths", "csv"):
        if isinstance(value, str) and option.kind == "csv":
            return parse_text(option, value)
        if not isinstance(value, list):
            raise SettingError(f"{value!r} is not a list")
        return tuple(parse_yaml_scalar(option, item) for item in value)
    return parse_yaml_scalar(option, value)


def parse_yaml_scalar(option: Option, value: object) -> Any:
    kind = option.kind.rstrip("s") if option.kind in ("ints", "strs", "paths") else option.kind
    if kind in ("bool", "onoff"):
        if not isinstance(value, bool):
            raise SettingError(f"{value!r} is not true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(f"{value!r} is not a whole number")
        return _scalar(option, str(value))
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingError(f"{value!r} is not a number")
        return _scalar(option, str(value))
    if not isinstance(value, str):
        raise SettingError(f"{value!r} is not a string")
    return _scalar(option, value)


def argparse_type(option: Option) -> Callable[[str], Any]:
    """argparse's type= for the flag: the same conversion as the environment's."""

    def convert(text: str) -> Any:
        try:
            return _scalar(option, text)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert
