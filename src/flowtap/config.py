"""The sensor's settings, validated with messages that say what to change."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from flowtap.loader.features import FEATURES
from flowtap.loader.system import cgroup2_mount
from flowtap.records.access_log import AccessLogs
from flowtap.records.http import CaptureLevel
from flowtap.records.policy import CaptureRule, EndpointCapture
from flowtap.settings.options import BY_NAME
from flowtap.sinks.objects import DEFAULT_ACCESS_URL, S3Settings, Secret
from flowtap.tls import plugins
from flowtap.tracking.environment import EnvTag
from flowtap.tracking.exe_filters import ExeFilter

Direction = Literal["egress", "ingress", "all", "egress-internal", "egress-external"]
Output = Literal["console", "json"]
TlsAttach = Literal["file", "process"]


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and how to fix it."""


def _thread_group(pid: int) -> int | None:
    """The process a task id belongs to (itself for a process), None if there is none."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return None


@dataclass(frozen=True)
class SensorConfig:
    pids: tuple[int, ...] = ()
    cgroup: Path | None = None
    exe_patterns: tuple[str, ...] = ()
    direction: Direction = "all"
    include_loopback: bool = False
    output: Output = "console"
    output_file: Path | None = None
    ready_file: Path | None = None
    stats_file: Path | None = None
    capture_level: CaptureLevel = "summary"
    max_body_bytes: int = 64 << 10
    redact: bool = True
    # Per-transaction capture levels from the configuration file's http_capture rules
    # (first match wins, else capture_level), and the rulekit macros they may call.
    http_rules: tuple[CaptureRule, ...] = ()
    rule_macros: tuple[tuple[str, str], ...] = ()
    http_endpoints: tuple[EndpointCapture, ...] = ()  # tap.endpoints: per-domain stacks
    # The configuration file's tap.filters: executables ignored (or traced only).
    exe_filters: tuple[ExeFilter, ...] = ()
    # The tap.http.stack's other plugins (docs/configuration.md): access_logs records,
    # http_metrics (/metrics' HTTP counters), report_usage (never sent) and debug (each
    # transaction's rule decision logged at DEBUG).
    access_logs: AccessLogs | None = None
    http_metrics: bool = False
    report_usage: bool = False
    debug_rules: bool = False
    env_tags: tuple[EnvTag, ...] = ()  # the file's tags: [{key, source: env, location}]
    # tap.audit_include_dns: DNS flow records (UDP to or from port 53) are emitted.
    audit_include_dns: bool = True
    tls_attach: TlsAttach = "file"
    tls_placement: Literal["auto", "exported"] = "auto"
    tls_probes: tuple[str, ...] = plugins.NAMES  # the TLS library plug-ins used
    stats_interval_s: float = 30.0
    # The pipeline's outputs beside the records' stream (docs/outputs.md).
    sink_queue: int = 10_000
    store: Path | None = None
    store_max_age: float = 0.0
    store_max_bytes: int = 0
    # services.object_stores s3 (sinks/objects.py); the keys only from the file or env.
    s3_endpoint: str = ""
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_insecure: bool = False
    s3_access_url: str = DEFAULT_ACCESS_URL
    s3_access_key: Secret | None = None
    s3_secret_key: Secret | None = None
    ring_buffer_bytes: int = 8 << 20
    max_connections: int = 65536
    egress: bool = False
    egress_cgroup: Path | None = None  # None: the cgroup v2 root
    trust_store: Path | None = None
    proxy_port: int = 0  # explicit proxy (HTTP_PROXY/HTTPS_PROXY); 0: any free port
    egress_state_dir: Path = Path("/var/lib/flowtap")
    upstream_ca_file: Path | None = None  # extra roots for upstream servers
    proxy_header_timeout_s: float = 10.0  # a request head must arrive within this
    # Kernel features not to use even where present: runs (and tests) the fallbacks.
    avoid_kernel_features: tuple[str, ...] = ()
    exec_gate: bool = True  # hold execs of never-seen files until probed (fanotify)
    exec_hold_ms: int = 300  # the longest an exec is held
    exec_gate_paths: tuple[Path, ...] = ()  # mark these paths' filesystems only
    exec_gate_test_delay_ms: int = 0  # test-only: classification made slow on purpose
    # Where each setting not at its default came from ("--flag", "$VAR", "file:line: path"),
    # so that errors name what the user wrote; not part of the configuration's value.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def _src(self, name: str, label: str | None = None) -> str:
        """What to call a setting in an error: where its value came from, else its flag."""
        if name in self.origins:
            return self.origins[name]
        return label or BY_NAME[name].flag or name

    def s3_settings(self) -> S3Settings | None:
        """The S3 object store, if one is configured (else bodies stay inline)."""
        if not self.s3_endpoint:
            return None
        return S3Settings(
            self.s3_endpoint,
            self.s3_bucket,
            self.s3_region,
            self.s3_insecure,
            self.s3_access_url,
            self.s3_access_key,
            self.s3_secret_key,
        )

    def _validate_s3(self) -> None:
        settings = self.s3_settings()
        assert settings is not None
        parts = urlsplit(settings.endpoint_url)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            raise ConfigError(
                f"{self._src('s3_endpoint')} {self.s3_endpoint!r}: not an S3 endpoint; "
                "use HOST:PORT (https, or http with --s3-insecure) or an http(s):// URL"
            )

    def validate(self) -> None:
        for pid in self.pids:
            if pid <= 0:
                raise ConfigError(f"{self._src('pids')} {pid}: a process id is a positive number")
            tgid = _thread_group(pid)
            if tgid is None:
                raise ConfigError(
                    f"{self._src('pids')} {pid}: no such process; check the pid with `ps -p {pid}`"
                )
            if tgid != pid:
                raise ConfigError(
                    f"--pid {pid}: that is a thread of process {tgid}; use --pid {tgid}"
                )
        if self.cgroup is not None:
            self._validate_cgroup(self.cgroup)
        size = self.ring_buffer_bytes
        page = os.sysconf("SC_PAGE_SIZE")
        if size < page or size & (size - 1):
            raise ConfigError(
                f"{self._src('ring_buffer_bytes', 'ring buffer size')} {size}: "
                f"must be a power of two of at least {page} bytes"
            )
        if not 1 <= self.max_connections <= 1 << 22:
            raise ConfigError(
                f"{self._src('max_connections', 'max connections')} "
                f"{self.max_connections}: use 1 to 4194304"
            )
        if self.max_body_bytes < 0:
            raise ConfigError(
                f"{self._src('max_body_bytes')} {self.max_body_bytes}: use 0 or more bytes"
            )
        if not math.isfinite(self.stats_interval_s) or self.stats_interval_s <= 0:
            raise ConfigError("stats interval must be positive (seconds)")
        if bool(self.s3_endpoint) != bool(self.s3_bucket):
            raise ConfigError(
                f"{self._src('s3_endpoint')} and {self._src('s3_bucket')}: an S3 object store "
                "needs both an endpoint and a bucket"
            )
        if self.s3_endpoint:
            self._validate_s3()
        if self.egress:
            self._validate_egress()
        elif self.egress_cgroup is not None or self.trust_store is not None:
            raise ConfigError("--egress-cgroup and --trust-store need --egress")
        unknown = sorted(set(self.avoid_kernel_features) - set(FEATURES))
        if unknown:
            raise ConfigError(
                f"{self._src('avoid_kernel_features')} {','.join(unknown)}: not a kernel feature; "
                f"use any of {', '.join(FEATURES)}"
            )
        unknown = sorted(set(self.tls_probes) - set(plugins.NAMES))
        if unknown or not self.tls_probes:
            given = ",".join(unknown) if unknown else "(empty)"
            raise ConfigError(
                f"{self._src('tls_probes')} {given}: not a TLS library; "
                "use a comma-separated list of "
                f"{', '.join(plugins.NAMES)} (default: all)"
            )
        if not 1 <= self.exec_hold_ms <= 60_000:
            raise ConfigError(f"{self._src('exec_hold_ms')} {self.exec_hold_ms}: use 1 to 60000")
        for path in self.exec_gate_paths:
            if not path.exists():
                raise ConfigError(f"--exec-gate-path {path}: no such file or directory")
        if self.tls_attach == "process" and not self.pids:
            raise ConfigError(
                "--tls-attach process probes the --pid processes only: give --pid, "
                "or use --tls-attach file"
            )

    @property
    def tls_attach_mode(self) -> Literal["file", "process"]:
        """Per file unless asked: per-process probes spare untraced programs the trap, but
        each attach and detach makes the kernel walk every process mapping the library
        (milliseconds each), which a --pid tree of hundreds of processes turns into
        seconds at start and at stop (docs/tls.md)."""
        return "process" if self.tls_attach == "process" else "file"

    def _validate_egress(self) -> None:
        if not 0 <= self.proxy_port <= 65535:
            raise ConfigError(f"--proxy-port {self.proxy_port}: use 1 to 65535, or 0 for any")
        if self.egress_cgroup is not None:
            self._validate_cgroup(self.egress_cgroup, flag="--egress-cgroup")
        elif cgroup2_mount() is None:
            raise ConfigError("--egress needs cgroup v2, and no cgroup2 filesystem is mounted")
        for flag, path in (
            ("--trust-store", self.trust_store),
            ("--state-dir", self.egress_state_dir),
        ):
            if path is not None and path.exists() and not path.is_dir():
                raise ConfigError(f"{flag} {path}: not a directory")
        if not math.isfinite(self.proxy_header_timeout_s) or self.proxy_header_timeout_s <= 0:
            raise ConfigError(
                f"--proxy-header-timeout {self.proxy_header_timeout_s}: use a positive number "
                "of seconds"
            )
        if self.upstream_ca_file is not None and not self.upstream_ca_file.is_file():
            raise ConfigError(f"--upstream-ca-file {self.upstream_ca_file}: no such file")

    @staticmethod
    def _validate_cgroup(path: Path, flag: str = "--cgroup") -> None:
        root = cgroup2_mount()
        if root is None:
            raise ConfigError(f"{flag} needs cgroup v2, and no cgroup2 filesystem is mounted")
        resolved = path.resolve()
        if not resolved.is_dir():
            raise ConfigError(f"{flag} {path}: not a directory")
        if resolved != root and root not in resolved.parents:
            raise ConfigError(
                f"{flag} {path}: not inside the cgroup v2 hierarchy at {root} "
                f"(give a directory such as {root}/system.slice)"
            )
