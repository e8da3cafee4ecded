"""The sensor: loads the socket-layer programs, consumes their events, emits records."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import os
import queue
import resource
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flowtap import safefile
from flowtap.config import SensorConfig
from flowtap.discovery.cache import ClassCache
from flowtap.discovery.fanotify import FanotifyError
from flowtap.discovery.gate import ExecGate
from flowtap.discovery.worker import DiscoveryWorker
from flowtap.egress.strategy import Strategy, fill_running, kernel_strategy
from flowtap.events import (
    ConnClose,
    ConnOpen,
    Data,
    DecodeError,
    Event,
    EventDecoder,
    Exec,
    Exit,
    Fork,
    Task,
)
from flowtap.java.probing import JavaProbes, java_files_missing
from flowtap.loader import hooks
from flowtap.loader.btf import Btf, StructLayout
from flowtap.loader.errors import BpfError
from flowtap.loader.features import KernelFeatures
from flowtap.loader.libbpf import BpfLink, BpfMap, BpfObject, RingBuffer
from flowtap.loader.system import bpf_object_path, cgroup2_mount, require_btf, require_root
from flowtap.proxy.events import ConnectionEvent
from flowtap.proxy.records import egress_connection_record, egress_http_record
from flowtap.records.connection import Record, WallClock
from flowtap.records.finish import RecordFinisher
from flowtap.records.http import HttpRecordOptions
from flowtap.records.policy import CapturePolicy
from flowtap.settings.reload import ConfigWatcher
from flowtap.sinks.base import Sink
from flowtap.sinks.objects import ObjectStore
from flowtap.sinks.pipeline import Pipeline
from flowtap.tls import plugins
from flowtap.tls.attach import TlsProbes, running_pids
from flowtap.tls.plugins.javatls import JAVATLS
from flowtap.tracking.connections import ConnectionTracker
from flowtap.tracking.environment import EnvironmentReader
from flowtap.tracking.exe_filters import filter_matcher
from flowtap.tracking.listeners import existing_listeners
from flowtap.tracking.payloads import PayloadTracker
from flowtap.tracking.processes import ProcessInfo, ProcessRegistry, in_cgroup
from flowtap.tracking.scope import EGRESS_SCOPES, egress_in_scope

if TYPE_CHECKING:
    from flowtap.egress.controller import EgressController

log = logging.getLogger("flowtap")

# The kernel wakes us only once this much is waiting; otherwise we look every _POLL_MS.
_WAKEUP_BYTES = 256 << 10
_POLL_MS = 50
_EGRESS_BATCH = 10_000
# The proxy's counters of what it lost, in the drop report (a failed upstream or client
# handshake is not lost: its connection record says so, and a 502 is a transaction; a
# connection closed over the proxy's connection limit has no record at all).
_EGRESS_DROPS = (
    "parser_errors",
    "callback_errors",
    "refused_no_destination",
    "refused_over_limit",
    "http2_header_limit",
    "h2_flood_closed",
)
# The exec classes are written this often when they changed (and at stop).
# How often the exec classes are saved and the probes of deleted files that no process
# runs any more are removed (tls/attach.py).
_CACHE_SAVE_S = 5.0
_RESCAN_ASK_S = 1.0
# How long the Java thread waits for the discovery worker to probe a staged shim.
_SHIM_PROBE_WAIT_S = 10.0
# How long start() waits for the JVMs already running to be probed.
_JAVA_START_WAIT_S = 30.0
# Space kept for the stats file from start on, so a full disk still gets its counters.
_STATS_RESERVE = 64 << 10


@dataclass(slots=True)
class UserCounters:
    events: int = 0
    decode_errors: int = 0
    records: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def exe_matcher(patterns: tuple[str, ...]) -> Callable[[ProcessInfo], bool]:
    """--exe: a glob on the executable's path, its file name or the process name."""

    def matches(info: ProcessInfo) -> bool:
        names = [info.comm]
        if info.exe:
            names += [info.exe, os.path.basename(info.exe)]
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)

    return matches if patterns else (lambda _info: True)


def process_matcher(config: SensorConfig) -> Callable[[ProcessInfo], bool]:
    """--exe and the configuration file's tap.filters, both; and not a process whose
    QPOINT_STRATEGY is ignore as userspace reads it (with exe filters, which the kernel
    does not read: docs/egress.md)."""
    by_pattern = exe_matcher(config.exe_patterns)
    by_filter = filter_matcher(config.exe_filters) if config.exe_filters else None
    return lambda info: (
        info.strategy != "ignore" and by_pattern(info) and (by_filter is None or by_filter(info))
    )


class Sensor:
    def __init__(self, config: SensorConfig, sink: Sink | Pipeline) -> None:
        self.config = config
        # Records go through the pipeline: the consumer never waits for a destination.
        self._pipeline = sink if isinstance(sink, Pipeline) else Pipeline([("output", sink)])
        self.pipeline = self._pipeline  # read by the endpoints (queue depths, per-sink counts)
        self._obj: BpfObject | None = None
        self._links: list[BpfLink] = []
        self._ring: RingBuffer | None = None
        self._cgroup_fd: int | None = None
        # The S3 object store: bodies and headers at level full (sinks/objects.py).
        s3 = config.s3_settings()
        self.objects = ObjectStore(s3) if s3 is not None else None
        base = HttpRecordOptions(
            config.capture_level, config.max_body_bytes, config.redact, self.objects
        )
        self._policy = self._capture_policy(config, base)
        if config.report_usage:  # Qpoint's cloud usage report: flowtap sends nothing
            log.info("report_usage: accepted and ignored (flowtap sends no usage reports)")
        # What the parsers must keep: the most any rule can ask for.
        self._http_options = dataclasses.replace(base, level=self._policy.highest_level)
        self.registry = ProcessRegistry(environment=EnvironmentReader(config.env_tags))
        self.finisher = RecordFinisher(self.registry.tags_of, include_dns=config.audit_include_dns)
        self.counters = UserCounters()
        self.tracker = ConnectionTracker(
            self.registry,
            self._emit,
            accept_process=process_matcher(config),
            on_ended=self._connection_ended,
        )
        self.payloads = PayloadTracker(
            self._emit,
            self.tracker.visible_connection,
            self._http_options,
            policy=self._policy,
            skip=self._skip_payload,
        )
        self._decoder: EventDecoder | None = None
        self._kernel_counter_names: dict[int, str] = {}
        self._last_drop_report: dict[str, int] = {}
        self._unattributed_at_exit = 0
        self.egress: EgressController | None = None
        self.config_watcher: ConfigWatcher[SensorConfig] | None = None  # set by the CLI
        self.config_reloads = 0
        self.config_reloads_refused = 0
        self._kernel_copies_payload: bool | None = None  # known once the kernel is set up
        self._clock = WallClock()
        self.egress_unattributed = 0  # proxied records whose client process was unknown
        self._egress_counters: dict[str, int] = {}  # the proxy's final ones, once stopped
        self.tls: TlsProbes | None = None
        self.java: JavaProbes | None = None  # JVMs given the agent (java/probing.py)
        self.java_unavailable: str | None = None  # why Java probing is off
        self.tls_unavailable: str | None = None  # why the kernel refused the TLS probes
        self.plan: hooks.HookPlan | None = None  # what this kernel gets, per capability
        self._stopping = threading.Event()  # run()'s: set, TLS attach work is skipped
        self.worker = DiscoveryWorker()  # every scan and attach after start runs here
        self.cache = ClassCache(config.egress_state_dir)
        self.gate: ExecGate | None = None
        self.gate_unavailable: str | None = None
        self._gate_stats: dict[str, object] | None = None
        self._rescan_asked: dict[int, float] = {}
        self._stats_reservation: safefile.Reservation | None = None
        self._counter_errors = 0  # failed reads of the kernel's counters
        self._skip_layout: StructLayout | None = None
        self.skip_errors = 0  # payload_skips not written: those bytes are copied after all
        self._ready_written = False
        # For the endpoints (flowtap.httpd), read on their threads: start() done, and
        # when the consumer loop last turned (monotonic seconds).
        self.attached = False
        self.loop_at: float | None = None

    @property
    def programs_attached(self) -> int:
        return len(self._links)

    # --- start-up -------------------------------------------------------------------

    def start(self) -> None:
        require_root()
        require_btf()
        raise_open_files_limit()
        self._prepare_files()
        obj = BpfObject.open(bpf_object_path("conn.bpf.o"))
        try:
            self.plan = self._plan([program.name for program in obj.programs()])
        except BaseException:
            obj.close()
            raise
        if not self.plan.tls:
            self.tls_unavailable = "; ".join(
                f"{c.name}: {c.detail}" for c in self.plan.capabilities if c.name == hooks.OPENSSL
            )
        try:
            obj, btf = self._load(obj, with_tls=self.plan.tls)
        except BpfError as exc:
            if not self.plan.tls:
                raise
            # A kernel may still refuse what the TLS probes need, past what was probed:
            # connections and plaintext HTTP do not need them.
            obj, btf = self._load(BpfObject.open(bpf_object_path("conn.bpf.o")), with_tls=False)
            self.tls_unavailable = str(exc)
            log.warning(
                "TLS plaintext is off: the kernel refused the TLS probes (%s); connections "
                "and plaintext HTTP are still captured. `flowtap check` shows what this "
                "kernel offers.",
                exc,
            )
        self._obj = obj
        self._decoder = EventDecoder(btf)
        self._skip_layout = btf.struct_layout("ft_payload_skip")
        counters = btf.enum_values("ft_counter")
        self._kernel_counter_names = {
            value: name.removeprefix("FT_CNT_").lower()
            for name, value in counters.items()
            if name != "FT_CNT_MAX"
        }
        self._fill_filters(obj)
        self._ring = RingBuffer(obj.map("events"), self._on_record)
        for program in obj.programs():
            if not program.autoload or program.section.startswith(("uprobe", "uretprobe")):
                continue  # not for this kernel, or attached per TLS library file below
            link = program.attach()
            self._links.append(link)
            log.debug("attached %s", link.description)
        # After attaching: children forked from now on are followed by the kernel, and
        # processes exec'd from now on get their QPOINT_STRATEGY there too.
        self._add_existing_descendants(obj)
        fill_running(obj.map("strategies"), obj.map("ignore_in_use"))
        found = self.registry.scan()
        log.info("attributed %d processes already running", found)
        self._add_existing_listeners(obj, btf)
        if self._http_options.level != "none" and self.tls_unavailable is None:
            pids = self._attach_tls(obj)
            self.worker.start()
            self._start_gate(obj)
            self._start_java(obj, pids)
        if self.config.egress:
            self._start_egress(obj)
        log.info("ready: %d programs attached", len(self._links))
        self.attached = True
        if self.config.ready_file is not None:
            try:
                safefile.replace(self.config.ready_file, f"{os.getpid()}\n".encode())
            except OSError as exc:
                raise BpfError(
                    f"cannot write the ready file {self.config.ready_file}: {exc}",
                    fix="choose a path in a directory only root can write",
                ) from exc
            self._ready_written = True

    def _prepare_files(self) -> None:
        """Before anything is attached: a stale ready file goes (a script waiting for it
        must not start early), and the stats file's space is reserved."""
        cfg = self.config
        try:
            if cfg.ready_file is not None:
                safefile.remove(cfg.ready_file)
                st = safefile.lstat(cfg.ready_file)
                if st is not None:
                    raise safefile.UnsafeFileError(
                        f"{cfg.ready_file} is there and is not a file of ours to remove "
                        "(another user's, a link or not a regular file): a script waiting "
                        "for it would start before the sensor is ready; remove it, or "
                        "choose another path"
                    )
            if cfg.stats_file is not None:
                self._stats_reservation = safefile.Reservation(cfg.stats_file, _STATS_RESERVE)
        except OSError as exc:
            raise BpfError(
                f"cannot prepare the output files: {exc}",
                fix="use paths in directories root owns and only root can write",
            ) from exc

    def _plan(self, programs: list[str]) -> hooks.HookPlan:
        """Probes the kernel and picks, per capability, the best hook it has."""
        features = KernelFeatures.probe(self.config.avoid_kernel_features)
        plan = hooks.plan(features, programs)
        for capability in plan.capabilities:
            if capability.available:
                log.info("%s: %s (%s)", capability.name, capability.hook, capability.detail)
            else:
                log.warning("%s: off: %s", capability.name, capability.detail)
        connections = plan.capability(hooks.CONNECTIONS)
        if not connections.available:
            raise BpfError(
                f"this kernel cannot run the socket layer: {connections.detail}",
                fix="use Linux 5.10 or newer with BTF (Debian 11 and later); `flowtap check` "
                "says what this kernel offers",
            )
        return plan

    def _load(self, obj: BpfObject, *, with_tls: bool) -> tuple[BpfObject, Btf]:
        """Configures and loads the opened object: the programs and maps of the plan.
        Closes it on failure."""
        plan = self.plan
        assert plan is not None
        try:
            btf = Btf(obj)
            self._write_config(obj, btf)
            obj.map("events").set_max_entries(self.config.ring_buffer_bytes)
            obj.map("conns").set_max_entries(self.config.max_connections)
            tls = plan.tls_programs if with_tls else frozenset()
            plan.select(obj, lambda name: name in plan.programs or name in tls)
            obj.load()
        except BaseException:
            obj.close()
            raise
        return obj, btf

    def _write_config(self, obj: BpfObject, btf: Btf) -> None:
        cfg = self.config
        self._kernel_copies_payload = self._http_options.level != "none"
        layout = btf.struct_layout("ft_config")
        image = layout.pack(
            {
                "self_tgid": os.getpid(),
                "filter_pids": int(bool(cfg.pids)),
                "filter_cgroup": int(cfg.cgroup is not None),
                "trace_egress": int(cfg.direction.startswith("egress") or cfg.direction == "all"),
                "trace_ingress": int(cfg.direction in ("ingress", "all")),
                "include_loopback": int(cfg.include_loopback),
                "egress_scope": EGRESS_SCOPES[cfg.direction],
                "capture_payload": int(self._kernel_copies_payload),
                "wakeup_bytes": min(cfg.ring_buffer_bytes // 8, _WAKEUP_BYTES),
                "payload_limit_bytes": cfg.ring_buffer_bytes // 4 * 3,
                "notify_forks": int(
                    self._http_options.level != "none" and cfg.tls_attach_mode == "process"
                ),
                "features": self.plan.feature_bits(btf) if self.plan else 0,
                "thread_size": self.plan.thread_size if self.plan else 0,
            }
        )
        offset, size = btf.variable_offset(".rodata", "cfg")
        if size != len(image):
            raise RuntimeError(f"cfg is {size} bytes in .rodata, layout says {len(image)}")
        obj.map(".rodata").write_initial_value(offset, image)

    def _fill_filters(self, obj: BpfObject) -> None:
        traced = obj.map("traced_pids")
        for pid in self.config.pids:
            traced.update(struct.pack("<I", pid), b"\x01")
        if self.config.cgroup is not None:
            self._cgroup_fd = os.open(self.config.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            obj.map("filter_cgroup").update(
                struct.pack("<I", 0), struct.pack("<I", self._cgroup_fd)
            )

    def _add_existing_descendants(self, obj: BpfObject) -> None:
        """--pid: descendants forked before the fork hook was attached. A child forked by
        one of them during a scan is found by the next scan, so repeat until stable."""
        if not self.config.pids:
            return
        traced = obj.map("traced_pids")
        known: set[int] = set(self.config.pids)
        for _ in range(8):
            found: set[int] = set()
            for pid in self.config.pids:
                found |= self.registry.children(pid)
            new = found - known
            if not new:
                return
            for member in sorted(new):
                traced.update(struct.pack("<I", member), b"\x01")
            known |= new

    def _add_existing_listeners(self, obj: BpfObject, btf: Btf) -> None:
        """Owners of ports that were listening before listen() could be seen."""
        layout = btf.struct_layout("ft_listener")
        key_layout = btf.struct_layout("ft_listener_key")
        # /proc/net/tcp lists this network namespace's sockets only.
        netns = os.stat("/proc/self/ns/net").st_ino
        listeners = obj.map("listeners")
        traced_pids = self._traced_pid_set(obj)
        for listener in existing_listeners():
            info = self.registry.lookup(Task(listener.pid, listener.pid, 0, ""))
            traced = listener.pid != os.getpid() and (
                traced_pids is None or info.pid in traced_pids
            )
            if traced and self.config.cgroup is not None:
                traced = in_cgroup(listener.pid, self.config.cgroup)
            value = layout.pack(
                {
                    "task.pid": info.pid,
                    "task.tid": info.pid,
                    "task.uid": info.uid,
                    "task.comm": info.comm.encode()[:15],
                    "traced": int(traced),
                }
            )
            with contextlib.suppress(BpfError):  # listen() seen since attach: it wins
                key = key_layout.pack({"netns": netns, "port": listener.port})
                listeners.update(key, value, BpfMap.BPF_NOEXIST)

    def _attach_tls(self, obj: BpfObject) -> list[int]:
        """TLS probes on the host's libssl and on what running traced processes map;
        returns those processes."""
        try:
            known = self.cache.load()
        except OSError as exc:
            known = 0
            log.warning("exec classes not read from %s: %s", self.cache.path, exc)
        log.info("exec classes: %d files known from %s", known, self.cache.path)
        self.tls = TlsProbes(
            obj,
            self.config.tls_attach_mode,
            internal=self.config.tls_placement == "auto",
            program_name=self.plan.program if self.plan else str,
            cache=self.cache,
            libraries=plugins.select(self.config.tls_probes),
            uprobe_multi=self.plan.uprobe_multi if self.plan else False,
        )
        self.tls.attach_system_libraries()
        traced = self._traced_pid_set(obj)
        pids = [
            pid
            for pid in running_pids()
            if pid != os.getpid()
            and (traced is None or pid in traced)
            and (self.config.cgroup is None or in_cgroup(pid, self.config.cgroup))
        ]
        self.tls.scan_all(pids)
        return pids

    def _start_java(self, obj: BpfObject, pids: list[int]) -> None:
        """Java probing: every running JVM in scope now, later ones at exec or at their
        first connection (java/probing.py)."""
        if JAVATLS.name not in self.config.tls_probes:
            self.java_unavailable = f"switched off (--tls-probes without {JAVATLS.name})"
            return
        missing = java_files_missing()
        if missing is not None:
            self.java_unavailable = missing
            log.warning("java: not probed: %s", missing)
            return
        scope = self._scope_check(obj)
        matches = process_matcher(self.config)

        def in_scope(pid: int) -> bool:
            if not scope(pid):
                return False
            info = self.registry.read(pid)  # QPOINT_STRATEGY=ignore included
            return info is not None and matches(info)

        self.java = JavaProbes(self._probe_shim, in_scope)
        self.java.start()
        for pid in pids:
            self.java.consider(pid)
        # JVMs already running are probed before the sensor says it is ready.
        if not self.java.settle(_JAVA_START_WAIT_S):
            log.warning("java: JVMs still being probed after %.0f s", _JAVA_START_WAIT_S)

    def _probe_shim(self, path: Path, pid: int) -> bool:
        """On the Java thread: the staged shim probed by the discovery worker (the only
        thread that attaches), awaited."""
        tls = self._tls()
        if tls is None:
            return False
        done = threading.Event()
        result: list[bool] = []

        def job() -> None:
            try:
                result.append(tls.probe_staged(path, pid))
            finally:
                done.set()

        self.worker.submit(job, urgent=True)
        return done.wait(_SHIM_PROBE_WAIT_S) and result == [True]

    def _start_gate(self, obj: BpfObject) -> None:
        """The exec gate (fanotify), or why not: then exec events are the fallback."""
        cfg = self.config
        if self.tls is None:
            return
        if not cfg.exec_gate:
            self.gate_unavailable = "--exec-gate off"
            return
        gate = ExecGate(
            self.tls,
            self.worker,
            self.cache,
            hold_s=cfg.exec_hold_ms / 1000,
            in_scope=self._scope_check(obj),
            paths=cfg.exec_gate_paths,
            test_delay_s=cfg.exec_gate_test_delay_ms / 1000,
        )
        try:
            gate.start()
        except (FanotifyError, OSError) as exc:
            self.gate_unavailable = str(exc)
            log.warning(
                "exec gate off (%s): programs are probed from their exec events, so a "
                "program's first TLS calls can be missed; its next runs are covered",
                exc,
            )
            return
        self.gate = gate
        # Exec events no longer need to wake the consumer at once (bpf/sensor/common.h).
        self.tls.set_flag("exec_gated")
        log.info(
            "exec gate on: execs held up to %d ms on %s", cfg.exec_hold_ms, ", ".join(gate.marked)
        )

    def _scope_check(self, obj: BpfObject) -> Callable[[int], bool]:
        """Whether a process is traced (--pid, --cgroup), for the gate's answering thread:
        a map lookup or one /proc read, nothing that an exec hold can block."""
        traced = obj.map("traced_pids")
        cgroup: str | None = None
        root = cgroup2_mount()
        if self.config.cgroup is not None and root is not None:
            relative = self.config.cgroup.resolve().relative_to(root)
            cgroup = "/" + "/".join(relative.parts)  # "/" for the root itself

        def in_scope(pid: int) -> bool:
            if self.config.pids and traced.lookup(struct.pack("<I", pid)) is None:
                return False
            if cgroup is not None:
                try:
                    text = open(f"/proc/{pid}/cgroup").read()  # noqa: SIM115 (one read)
                except OSError:
                    return False
                line = next((x for x in text.splitlines() if x.startswith("0::")), "0::")
                path = line[3:]
                return cgroup in ("/", path) or path.startswith(cgroup + "/")
            return True

        return in_scope

    def _start_egress(self, obj: BpfObject) -> None:
        # Imported here: the proxy's TLS stack takes seconds to import on slow machines.
        from flowtap.egress.controller import EgressController, EgressError  # noqa: PLC0415

        traced = obj.map("traced_pids")
        accept_exe = process_matcher(self.config)

        def in_scope(info: ProcessInfo) -> bool:
            """The sensor's filters, for a proxy client (asked on the proxy's thread)."""
            cfg = self.config
            if cfg.pids and traced.lookup(struct.pack("<I", info.pid)) is None:
                return False
            if cfg.cgroup is not None and not in_cgroup(info.pid, cfg.cgroup):
                return False
            return accept_exe(info)

        self.egress = EgressController(
            self.config, obj.map("strategies"), self._http_options, in_scope
        )
        try:
            self.egress.start()
        except EgressError as exc:
            raise BpfError(str(exc)) from exc
        self.tracker.hidden_remotes = frozenset(self.egress.transparent_addresses())

    def _drain_egress(self) -> None:
        """Records from what the proxy reported since the last call (bounded per call)."""
        egress = self.egress
        if egress is None:
            return
        for _ in range(_EGRESS_BATCH):
            try:
                report = egress.reports.get_nowait()
            except queue.Empty:
                return
            ctx = report.context if isinstance(report, ConnectionEvent) else report[1]
            client = egress.client(ctx.pid)
            if client is None:
                self.egress_unattributed += 1
                continue
            process, in_scope = client
            if not in_scope or not egress_in_scope(self.config.direction, ctx.destination[0]):
                continue
            if isinstance(report, ConnectionEvent):
                self._emit(egress_connection_record(report, process, self._clock))
                continue
            record = egress_http_record(
                report[0], ctx, process, self._http_options, self._clock, policy=self._policy
            )
            if record is not None:
                self._emit(record)

    def _traced_pid_set(self, obj: BpfObject) -> set[int] | None:
        """The --pid set as the kernel has it now (None: no --pid filter)."""
        if not self.config.pids:
            return None
        return {struct.unpack("<I", key)[0] for key in obj.map("traced_pids").iter_keys()}

    # --- event loop -----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        if self._ring is None:
            raise RuntimeError("start() the sensor before run()")
        next_stats = time.monotonic() + self.config.stats_interval_s
        next_save = time.monotonic() + _CACHE_SAVE_S
        self._stopping = stop
        while not stop.is_set():
            self.loop_at = time.monotonic()
            if self.config_watcher is not None and (new := self.config_watcher.poll()):
                self.reconfigure(new)
            if self._ring.consume() == 0:
                self._ring.poll(_POLL_MS)
            self._drain_egress()
            if time.monotonic() >= next_save:
                if (tls := self._tls()) is not None:
                    self.worker.submit(tls.release_deleted)
                if self.cache.dirty:
                    self.worker.submit(self._save_cache)
                next_save = time.monotonic() + _CACHE_SAVE_S
            if time.monotonic() >= next_stats:
                self.report_drops(final=False)
                next_stats = time.monotonic() + self.config.stats_interval_s

    # Settings a running sensor can change; the others are fixed in the kernel, the
    # attached probes or the open files until a restart.
    RELOADABLE = (
        "capture_level",
        "http_rules",
        "rule_macros",
        "http_endpoints",
        "max_body_bytes",
        "redact",
        "access_logs",
        "debug_rules",
    )

    def reconfigure(self, new: SensorConfig) -> bool:
        """Applies a reloaded configuration's capture settings (on the event loop thread)."""
        base = HttpRecordOptions(new.capture_level, new.max_body_bytes, new.redact, self.objects)
        try:
            policy = self._capture_policy(new, base)
        except ValueError as exc:  # the file's check passed, so this is a bug: keep running
            self.config_reloads_refused += 1
            log.warning("configuration not reloaded: %s", exc)
            return False
        if policy.highest_level != "none" and not self._kernel_copies_payload:
            self.config_reloads_refused += 1
            log.warning(
                "configuration not reloaded: it captures HTTP, but this sensor started at "
                "capture level none and does not copy payloads; restart flowtap to apply it"
            )
            return False
        fixed = sorted(
            name
            for name in SensorConfig.__dataclass_fields__
            if name not in (*self.RELOADABLE, "origins")
            and getattr(new, name) != getattr(self.config, name)
        )
        if fixed:
            log.warning(
                "configuration reloaded, but %s changed: that takes a restart of flowtap",
                ", ".join(fixed),
            )
        self._policy = policy
        self._http_options = dataclasses.replace(base, level=policy.highest_level)
        self.payloads.set_policy(policy)
        if self.egress is not None:
            self.egress.set_capture(self._http_options)
        self.config = dataclasses.replace(
            self.config, **{name: getattr(new, name) for name in self.RELOADABLE}
        )
        self.config_reloads += 1
        log.info("capture level %s, %d rules, from now on", new.capture_level, len(new.http_rules))
        return True

    def _capture_policy(self, config: SensorConfig, base: HttpRecordOptions) -> CapturePolicy:
        """Levels, rules and access logs; QPOINT_STRATEGY=audit processes get no payload
        records (the registry's view, exe filters applied)."""
        return CapturePolicy(
            base,
            config.http_rules,
            config.rule_macros,
            config.http_endpoints,
            config.access_logs,
            emit=self._emit,
            audited=lambda pid: self.registry.strategy_of(pid) == "audit",
            debug=config.debug_rules,
        )

    def _apply_strategy(self, info: ProcessInfo) -> None:
        """The kernel reads bare `forward` and `ignore` at exec; a value with exe filters
        (or `proxy`) is only read here: its entry is written now, after the exec event
        (connections made before this are observed: docs/egress.md)."""
        strategy = kernel_strategy(info.strategy)
        if strategy is Strategy.OBSERVE or self._obj is None:
            return
        key = struct.pack("<I", info.pid)
        try:
            self._obj.map("strategies").update(key, struct.pack("<B", strategy))
            if strategy is Strategy.IGNORE:
                self._obj.map("ignore_in_use").update(struct.pack("<I", 0), struct.pack("<I", 1))
        except BpfError as exc:
            log.debug("QPOINT_STRATEGY of %d not written: %s", info.pid, exc)

    def _on_record(self, data: bytes) -> None:
        self.counters.events += 1
        try:
            event = self._decode(data)
        except DecodeError as exc:
            self.counters.decode_errors += 1
            log.debug("undecodable event: %s", exc)
            return
        kind = type(event).__name__
        self.counters.by_kind[kind] = self.counters.by_kind.get(kind, 0) + 1
        self._dispatch(event)

    def _decode(self, data: bytes) -> Event:
        if self._decoder is None:
            raise DecodeError("decoder not ready")
        return self._decoder.decode(data)

    def _tls(self) -> TlsProbes | None:
        """The TLS probes, unless stopping: attaching can take milliseconds each, and
        a backlog of them must not hold up SIGINT."""
        return None if self._stopping.is_set() else self.tls

    def _save_cache(self) -> None:
        """On the worker (the only thread that changes the cache)."""
        try:
            self.cache.save()
        except OSError as exc:
            log.warning("exec classes not saved to %s: %s", self.cache.path, exc)

    def _dispatch(self, event: Event) -> None:
        # TLS work goes to the discovery worker: scans and attaches never stall this loop.
        if isinstance(event, Data):
            self.payloads.on_data(event)
            return
        tls = self._tls()
        pid = event.task.pid
        match event:
            case ConnOpen():
                self.tracker.on_open(event)
                if tls is not None and self._rescan_due(pid):
                    self.worker.submit(lambda: tls.on_connection(pid))
                if self.java is not None:
                    self.java.consider(pid)
            case ConnClose():
                self.tracker.on_close(event)
            case Exec():
                self._apply_strategy(self.registry.on_exec(event))
                if tls is not None:
                    self.worker.submit(lambda: self._on_exec(tls, event))
                if self.java is not None:
                    self.java.on_exec(pid)
            case Exit():
                self.registry.on_exit(event)
                self._rescan_asked.pop(pid, None)
                if tls is not None:
                    self.worker.submit(lambda: tls.forget_process(pid))
                if self.java is not None:
                    self.java.forget(pid)
            case Fork():
                # Process mode: the child needs probes of its own. In file mode it maps
                # what its parent did, probed for every process already.
                if tls is not None and tls.mode == "process":
                    self.worker.submit(lambda: tls.on_fork(pid))

    def _rescan_due(self, pid: int) -> bool:
        """At most one connection-time rescan request per process a second: the worker
        applies its own interval, this only keeps a connection storm off its queue."""
        now = time.monotonic()
        last = self._rescan_asked.get(pid)
        if last is not None and now - last < _RESCAN_ASK_S:
            return False
        self._rescan_asked[pid] = now
        return True

    def _on_exec(self, tls: TlsProbes, event: Exec) -> None:
        """On the worker. Without the gate, the file the exec event names is classified
        even when its process has exited (its next run is then covered)."""
        if self._stopping.is_set():
            return
        if self.gate is None and event.filename:
            tls.on_exec_file(event.task.pid, event.ppid, event.filename)
        elif self.gate is not None and tls.mode == "file" and self.gate.covers(event.task.pid):
            # The gate classified (and probed) its file before it ran, and its libraries
            # are not mapped yet: its first connection looks at them.
            return
        tls.on_exec(event.task.pid)

    def _skip_payload(self, conn_id: int, tx_until: int, rx_until: int) -> None:
        """The parser keeps none of a connection's bytes before these positions (of the
        socket or of the TLS plaintext, whichever carries its HTTP): the kernel sends
        their length only. (0, 0): the connection is over."""
        if self._obj is None or self._skip_layout is None:
            return
        skips = self._obj.map("payload_skips")
        key = struct.pack("<Q", conn_id)
        try:
            if tx_until or rx_until:
                value = self._skip_layout.pack({"tx_until": tx_until, "rx_until": rx_until})
                skips.update(key, value)
            else:
                skips.delete(key)
        except BpfError as exc:
            # Harmless: the bytes are copied as before.
            self.skip_errors += 1
            log.debug("payload skip of connection %d not written: %s", conn_id, exc)

    def _connection_ended(self, event: ConnClose) -> None:
        self.payloads.on_close(
            event.conn.conn_id,
            event.timestamp_ns,
            sent=event.bytes_sent,
            received=event.bytes_received,
        )

    def _emit(self, record: Record) -> None:
        """To every sink's queue; never blocks (sinks/pipeline.py)."""
        finished = self.finisher.finish(record)  # tags; DNS flows left out if asked
        if finished is None:
            return
        record = finished
        self.counters.records += 1
        self._pipeline.submit(record)

    # --- accounting -----------------------------------------------------------------

    def kernel_counters(self) -> dict[str, int]:
        """Drops and failures counted in the kernel, summed over CPUs."""
        if self._obj is None:
            return {}
        counters = self._obj.map("counters")
        per_cpu = counters.value_size // 8
        totals: dict[str, int] = {}
        for index, name in self._kernel_counter_names.items():
            try:
                raw = counters.lookup(struct.pack("<I", index)) or b""
            except BpfError as exc:
                # Out of descriptors, or memory: a report without this counter beats
                # ending the sensor over it.
                self._counter_errors += 1
                if self._counter_errors == 1:
                    log.warning("could not read the kernel counter %s: %s", name, exc)
                continue
            totals[name] = sum(struct.unpack(f"<{per_cpu}Q", raw)) if raw else 0
        if self._counter_errors:
            totals["counter_read_errors"] = self._counter_errors
        return totals

    def drop_report(self) -> dict[str, int]:
        report = self.kernel_counters()
        report["ingress_unattributed"] = (
            report.get("ingress_unattributed", 0) + self._unattributed_at_exit
        )
        report["decode_errors"] = self.counters.decode_errors
        report["sink_errors"] = self._pipeline.errors()
        report["sink_dropped"] = sum(self._pipeline.dropped().values())
        if self.objects is not None:
            report["object_upload_errors"] = self.objects.stats.errors
            report["object_upload_dropped"] = self.objects.stats.dropped
        report["late_events"] = self.tracker.stats.late_events
        report["tracker_evicted"] = self.tracker.stats.evicted
        report["closes_lost"] = self.tracker.stats.lost
        report["payload_gaps"] = self.payloads.stats.gaps
        report["http_parser_errors"] = self.payloads.stats.parser_errors
        report["http2_header_limit"] = self.payloads.stats.http2_header_limit
        if self.config.egress:
            report["egress_unattributed"] = self.egress_unattributed
            proxy = self.egress.counters() if self.egress else self._egress_counters
            for name in _EGRESS_DROPS:
                report[f"egress_{name}"] = proxy.get(name, 0)
        return report

    def report_drops(self, *, final: bool) -> dict[str, int]:
        report = self.drop_report()
        lost = {name: value for name, value in report.items() if value}
        changed = report != self._last_drop_report
        self._last_drop_report = report
        summary = (
            f"events {self.counters.events}, records {self.counters.records}, "
            f"open connections {self.tracker.open_count}"
        )
        if final or (changed and lost):
            details = ", ".join(f"{k}={v}" for k, v in sorted(lost.items())) or "nothing lost"
            level = logging.WARNING if lost else logging.INFO
            log.log(level, "%s%s; %s", "exit summary: " if final else "", summary, details)
            if words := describe_connections_lost(connections_lost(report)):
                log.warning("%s%s", "exit summary: " if final else "", words)
        for name, count in self._pipeline.dropped().items():
            if count and (final or changed):
                log.warning(
                    "sink_dropped{sink=%s}=%d: %d records lost for sink %s (its queue of %d was "
                    "full: a slow or stuck destination; raise --sink-queue or fix the output)",
                    name,
                    count,
                    count,
                    name,
                    self._pipeline.capacity_of(name),
                )
        return report

    def _write_stats(self, drops: dict[str, int]) -> None:
        if self.config.stats_file is None:
            return
        stats: dict[str, object] = {
            "events": self.counters.events,
            "events_by_kind": self.counters.by_kind,
            "records": self.counters.records,
            "connections_opened": self.tracker.stats.opened,
            "connections_closed": self.tracker.stats.closed,
            "connections_redirected": self.tracker.stats.redirected,
            "opens_synthesized": self.tracker.stats.opens_synthesized,
            "opens_lost_made_at_close": self.tracker.stats.opens_lost,
            # Socket and TLS payload the kernel copied, body bytes past the capture limit
            # it only counted (userspace asked), and bytes lost in gaps.
            "payload_bytes_copied": self.payloads.stats.bytes,
            "payload_bytes_skipped": self.payloads.stats.skipped_bytes,
            "payload_bytes_lost": self.payloads.stats.gap_bytes,
            "payload_skip_errors": self.skip_errors,  # those bodies were copied after all
            "filtered_in_userspace": self.tracker.stats.filtered,
            "connections_lost": connections_lost(drops),
            "drops": drops,
            "sink_dropped": self._pipeline.dropped(),
            "sinks": {
                name: {"written": st.written, "errors": st.errors, "dropped": st.dropped}
                for name, st in self._pipeline.stats().items()
            },
        }
        if self.objects is not None:
            stats["objects"] = dataclasses.asdict(self.objects.stats)
        if self.config.http_rules or self.config.http_endpoints or self.config.access_logs:
            stats["capture_rules"] = dict(self._policy.chosen)  # what each rule chose
        # QPOINT_TAGS and QPOINT_STRATEGY values ignored, DNS flows left out, access logs.
        stats["environment"] = dataclasses.asdict(self.registry.environment.stats)
        stats["dns_records_left_out"] = self.finisher.dns_dropped
        stats["access_logs"] = self._policy.access_logs
        if self.config_watcher is not None:
            stats["configuration"] = {
                "reloads": self.config_reloads,
                "reloads_refused": self.config_reloads_refused + self.config_watcher.refused,
            }
        if self.plan is not None:
            stats["kernel"] = {"release": os.uname().release} | self.plan.as_dict()
        if self.tls_unavailable is not None:
            stats["tls"] = {"unavailable": self.tls_unavailable}
        if self.config.egress:
            stats["egress"] = self._egress_counters
        if self.tls is not None:
            stats["tls"] = {
                "mode": self.tls.mode,
                "files_examined": self.tls.stats.files_examined,
                "cache_hits": self.tls.stats.cache_hits,
                "attach_failures": self.tls.stats.attach_failures,
                "attach_deferred": self.tls.stats.attach_deferred,
                "files_released": self.tls.stats.files_released,
                "attached": self.tls.stats.attached,
            }
        if self.java is not None:
            stats["java"] = dataclasses.asdict(self.java.stats)
        elif self.java_unavailable is not None:
            stats["java"] = {"unavailable": self.java_unavailable}
        if self.tls is not None:
            gate: dict[str, object] = {"on": self._gate_stats is not None}
            if self._gate_stats is not None:
                gate.update(self._gate_stats)
            if self.gate_unavailable is not None:
                gate["unavailable"] = self.gate_unavailable
            gate["worker_dropped"] = self.worker.dropped
            gate["worker_failed"] = self.worker.failed
            stats["exec_gate"] = gate
        data = (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode()
        try:
            if self._stats_reservation is not None:
                reservation, self._stats_reservation = self._stats_reservation, None
                reservation.commit(data)
            else:
                safefile.replace(self.config.stats_file, data)
        except OSError as exc:
            log.error(
                "the stats file %s was not written: %s; free space on its filesystem, or "
                "choose a path in a directory only root can write",
                self.config.stats_file,
                exc,
            )

    # --- shutdown -------------------------------------------------------------------

    def _stop_egress(self) -> None:
        """Redirection off first (new connections go direct), then the proxy stops and its
        last reports become records."""
        if self.egress is not None:
            self.egress.stop()
            self._drain_egress()
            self._egress_counters = self.egress.counters()
            self.egress = None

    def _stop_discovery(self) -> None:
        """The gate first (closing its descriptor releases every held exec), then the
        worker (bounded), then the classes are written."""
        if self.gate is not None:
            self.gate.stop()
            self._gate_stats = self.gate.stats.report()
            self.gate = None
        if not self.worker.stop():
            log.warning("the discovery worker did not finish its job in time")
        self._save_cache()

    def _detach(self) -> None:
        if self.java is not None:  # before the worker: an attach may wait on it
            self.java.stop()
        self._stop_discovery()
        self._stop_egress()
        if self.tls is not None:
            self.tls.detach()
        for link in self._links:
            link.destroy()
        self._links.clear()

    def _remaining(self) -> tuple[list[ConnClose], list[ConnClose]]:
        """Connections the kernel still tracks, as close events built from its table:
        (still open, ended but not yet released by their program)."""
        if self._obj is None or self._decoder is None:
            return [], []
        conns = self._obj.map("conns")
        now = time.monotonic_ns()
        still_open: list[ConnClose] = []
        ended: list[ConnClose] = []
        for key in list(conns.iter_keys()):
            raw = conns.lookup(key)
            if raw is None:
                continue
            tracked = self._decoder.tracked(raw, now)
            if tracked.dropped:
                self._unattributed_at_exit += tracked.unattributed
                continue
            (ended if tracked.ended else still_open).append(tracked.close)
        ended.sort(key=lambda event: event.conn.conn_id)
        still_open.sort(key=lambda event: event.conn.conn_id)
        return still_open, ended

    def stop(self) -> dict[str, int]:
        """Detaches everything, drains events, closes what is still open; returns drops."""
        report: dict[str, int] = {}
        try:
            # Detach first: nothing can be submitted after the drain and before the walk
            # of the table; the maps stay readable until the object is closed.
            self._detach()
            if self._ring is not None:
                for _ in range(100):  # bounded drain
                    if self._ring.consume() == 0:
                        break
                still_open, ended = self._remaining()
                for event in ended:
                    self.tracker.on_close(event)
                self.tracker.close_remaining(still_open)
                self.tracker.close_lost(time.monotonic_ns())
                self._pipeline.close()  # bounded: every count is final after it
                if self.objects is not None:
                    self.objects.close()  # bounded too
                report = self.report_drops(final=True)
                self._write_stats(report)
        finally:
            self._detach()
            if self._ring is not None:
                self._ring.free()
                self._ring = None
            if self._obj is not None:
                self._obj.close()
                self._obj = None
            if self._cgroup_fd is not None:
                os.close(self._cgroup_fd)
                self._cgroup_fd = None
            if self._stats_reservation is not None:
                self._stats_reservation.abandon()
                self._stats_reservation = None
            if self._ready_written and self.config.ready_file is not None:
                safefile.remove(self.config.ready_file)  # a script must not see a stopped sensor
                self._ready_written = False
            self._pipeline.close()
        return report


def connections_lost(drops: dict[str, int]) -> dict[str, int]:
    """Whole connections the user lost, from the kernel's per-connection counts (an open
    or close event that found the ring buffer full). The first two overlap the third."""
    return {
        "without_open_event": drops.get("conn_open_lost", 0),
        "without_close_event": drops.get("conn_close_lost", 0),
        "without_any_record": drops.get("conn_unreported", 0),
    }


def describe_connections_lost(lost: dict[str, int]) -> str | None:
    """The exit summary's words for connections_lost; None when nothing was lost."""
    if not any(lost.values()):
        return None
    parts = []
    if n := lost["without_any_record"]:
        parts.append(f"{n} have no record at all (neither open nor close)")
    if n := lost["without_open_event"]:
        parts.append(
            f"{n} lost their open event (the open record is written at their close; "
            "their HTTP is not recorded)"
        )
    if n := lost["without_close_event"]:
        parts.append(
            f"{n} lost their close event (the close record says status lost, without byte counts)"
        )
    return (
        "connections lost because the sensor fell behind (the ring buffer was full): "
        + "; ".join(parts)
        + ". Raise ring_buffer_bytes, or trace fewer processes"
    )


def raise_open_files_limit() -> None:
    """Soft limit of open files up to the hard one: every probe link, map and proxied
    connection takes a descriptor, and 1,024 (a common default) runs out under load."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling, then
        try:
            with open("/proc/sys/fs/nr_open") as stream:
                target = int(stream.read())
        except (OSError, ValueError):
            return
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("the open files limit stays %d (hard %d): %s", soft, hard, exc)
        return
    log.debug("open files limit raised from %d to %d", soft, target)
