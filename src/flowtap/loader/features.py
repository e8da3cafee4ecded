"""What the running kernel offers the socket layer, probed for real before load.

Each feature is probed the way the sensor will use it (a helper called from a BTF
tracepoint program, an fentry program on the very function flowtap hooks, an atomic
instruction), never guessed from the kernel version: distributions backport freely.
`avoid` takes features away on purpose, to run (and test) the fallbacks on a kernel that
has better: `flowtap run --avoid-kernel-features loop,task-storage`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gzip
import os
import platform
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flowtap.loader import kernel

# Tracepoints every kernel from 5.10 has; the socket layer cannot do without them.
CORE_TRACEPOINTS = (
    "inet_sock_set_state",
    "tcp_destroy_sock",
    "sched_process_fork",
    "sched_process_exec",
    "sched_process_exit",
)
# Byte counts at sock_sendmsg/sock_recvmsg (Linux 6.3).
SOCKET_TRACEPOINTS = ("sock_send_length", "sock_recv_length")
# Where the fexit and kprobe fallbacks hook (inet_sendpage: sendfile and splice, < 6.5).
SOCKET_FUNCTIONS = (
    "inet_sendmsg",
    "inet6_sendmsg",
    "inet_recvmsg",
    "inet6_recvmsg",
    "inet_sendpage",
    "inet_release",
)

# enum bpf_func_id values (include/uapi/linux/bpf.h), probed from a tp_btf program.
HELPERS = {
    "socket-cookie": 46,  # bpf_get_socket_cookie (tracing programs: 5.12)
    "task-storage": 156,  # bpf_task_storage_get (5.11)
    "task-btf": 158,  # bpf_get_current_task_btf (5.11)
    "for-each": 164,  # bpf_for_each_map_elem (5.13)
    "task-pt-regs": 175,  # bpf_task_pt_regs (5.15)
    "loop": 181,  # bpf_loop (5.17)
}
# Every feature `avoid` may name.
FEATURES = (
    "sock-tracepoints",
    "fentry",
    "kprobes",
    "uprobes",
    "uprobe-multi",
    "atomics",
    *HELPERS,
)

# An atomic fetch-and-add and a compare-and-swap on a stack slot (5.12), in a socket filter.
_ATOMICS_PROGRAM = bytes.fromhex(
    "b701000000000000"  # r1 = 0
    "7b1af8ff00000000"  # *(u64 *)(r10 - 8) = r1
    "b702000001000000"  # r2 = 1
    "db2af8ff01000000"  # r2 = atomic_fetch_add((u64 *)(r10 - 8), r2)
    "b700000000000000"  # r0 = 0
    "db2af8fff1000000"  # r0 = cmpxchg((u64 *)(r10 - 8), r0, r2)
    "b700000000000000"  # r0 = 0
    "9500000000000000"  # exit
)
_BPF_PROG_TYPE_SOCKET_FILTER = 1
_FAN_CLOEXEC = 0x01
_FAN_CLASS_CONTENT = 0x04
_X86_64_THREAD_SIZE = 16 << 10  # PAGE_SIZE << THREAD_SIZE_ORDER (2)


def _helper_call(helper_id: int) -> bytes:
    # call helper; r0 = 0; exit
    return struct.pack("<BBhi", 0x85, 0, 0, helper_id) + kernel.PROG_RET0


def _kernel_config(release: str) -> str:
    """The running kernel's build configuration, or "" where it is not published."""
    for path in (Path(f"/boot/config-{release}"), Path("/proc/config.gz")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        return (gzip.decompress(data) if path.suffix == ".gz" else data).decode(errors="replace")
    return ""


def thread_size(release: str) -> int:
    """x86_64's THREAD_SIZE: doubled by KASAN, which Debian's kernels do not enable."""
    kasan = "CONFIG_KASAN=y" in _kernel_config(release).splitlines()
    return _X86_64_THREAD_SIZE << (1 if kasan else 0)


def _fanotify_permission_events() -> str | None:
    """None when a listener can hold execs (FAN_OPEN_EXEC_PERM), else why not."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.fanotify_init(_FAN_CLASS_CONTENT | _FAN_CLOEXEC, os.O_RDONLY)
    if fd >= 0:
        os.close(fd)
        return None
    err = ctypes.get_errno()
    if err == errno.EPERM:
        return "not root: fanotify permission events need CAP_SYS_ADMIN"
    if err == errno.EINVAL:
        return "fanotify permission events are not compiled in (CONFIG_FANOTIFY_ACCESS_PERMISSIONS)"
    return f"fanotify_init failed: {os.strerror(err)}"


@dataclass(frozen=True)
class KernelFeatures:
    """The probe results; `missing` says why each absent feature is absent."""

    release: str
    tracepoints: frozenset[str]
    functions: frozenset[str]
    missing: dict[str, str] = field(default_factory=dict)
    avoided: frozenset[str] = frozenset()
    thread_size: int = _X86_64_THREAD_SIZE
    egress: str | None = None  # why the egress controller's program types fail, if they do
    exec_hold: str | None = None  # why execs cannot be held, if they cannot

    def has(self, feature: str) -> bool:
        return feature not in self.missing and feature not in self.avoided

    def why_not(self, feature: str) -> str:
        if feature in self.avoided:
            return "avoided (--avoid-kernel-features)"
        return self.missing.get(feature, "available")

    @classmethod
    def probe(cls, avoid: Iterable[str] = ()) -> KernelFeatures:
        release = platform.release()
        root = os.geteuid() == 0
        wanted = [(kernel.BTF_KIND_TYPEDEF, "btf_trace_" + t) for t in CORE_TRACEPOINTS]
        wanted += [(kernel.BTF_KIND_TYPEDEF, "btf_trace_" + t) for t in SOCKET_TRACEPOINTS]
        wanted += [(kernel.BTF_KIND_FUNC, f) for f in SOCKET_FUNCTIONS]
        try:
            ids = kernel.find_btf_ids(wanted)
        except kernel.BtfError as exc:
            reason = f"no vmlinux BTF: {exc}"
            return cls(release, frozenset(), frozenset(), dict.fromkeys(FEATURES, reason))
        tracepoints = frozenset(
            name.removeprefix("btf_trace_") for kind, name in ids if kind == kernel.BTF_KIND_TYPEDEF
        )
        functions = frozenset(name for kind, name in ids if kind == kernel.BTF_KIND_FUNC)
        missing: dict[str, str] = {}
        absent = [t for t in SOCKET_TRACEPOINTS if t not in tracepoints]
        if absent:
            missing["sock-tracepoints"] = f"no tracepoint {', '.join(absent)} (Linux 6.3)"
        if not os.path.exists("/sys/bus/event_source/devices/kprobe/type"):
            missing["kprobes"] = "not compiled in (CONFIG_KPROBES unset)"
        if not os.path.exists("/sys/bus/event_source/devices/uprobe/type"):
            missing["uprobes"] = "not compiled in (CONFIG_UPROBE_EVENTS unset)"
        if not root:
            for name in ("fentry", "uprobe-multi", "atomics", *HELPERS):
                missing[name] = "cannot probe: not root"
        else:
            missing.update(_probe_programs(ids))
            if "uprobes" in missing:
                missing["uprobe-multi"] = missing["uprobes"]
            elif (multi := kernel.probe_uprobe_multi()).err:
                missing["uprobe-multi"] = multi.describe()
        return cls(
            release,
            tracepoints,
            functions,
            missing,
            frozenset(avoid),
            thread_size(release),
            _probe_egress() if root else "cannot probe: not root",
            _fanotify_permission_events(),
        )

    def flags(self) -> dict[str, bool]:
        """cfg.features, by enum ft_feature name (bpf/flowtap.h)."""
        task_btf = self.has("task-btf")
        return {
            "FT_FEATURE_TASK_BTF": task_btf,
            "FT_FEATURE_TASK_STORAGE": task_btf and self.has("task-storage"),
            "FT_FEATURE_TASK_PT_REGS": task_btf and self.has("task-pt-regs"),
            "FT_FEATURE_SOCKET_COOKIE": self.has("socket-cookie"),
        }


def _probe_programs(ids: dict[tuple[int, str], int]) -> dict[str, str]:
    """fentry, atomics and helpers, each by loading the smallest program that uses it."""
    missing: dict[str, str] = {}
    target = ids.get((kernel.BTF_KIND_FUNC, "inet_sendmsg"))
    if target is None:
        missing["fentry"] = "inet_sendmsg is not in the kernel's BTF"
    else:
        probe = kernel.probe_prog(kernel.BPF_PROG_TYPE_TRACING, kernel.BPF_TRACE_FENTRY, target)
        if probe.err == errno.EPERM:
            missing["fentry"] = "refused by the kernel (EPERM): lockdown or policy"
        elif probe.err:
            missing["fentry"] = f"refused: {probe.describe()}"
    atomics = kernel.probe_prog(_BPF_PROG_TYPE_SOCKET_FILTER, code=_ATOMICS_PROGRAM)
    if atomics.err:
        missing["atomics"] = f"no atomic fetch-and-add or compare-and-swap (5.12): {atomics.log}"
    tracepoint = ids.get((kernel.BTF_KIND_TYPEDEF, "btf_trace_inet_sock_set_state"))
    if tracepoint is None:
        for name in HELPERS:
            missing[name] = "no tracepoint inet_sock_set_state to probe helpers from"
        return missing
    base = kernel.probe_prog(kernel.BPF_PROG_TYPE_TRACING, kernel.BPF_TRACE_RAW_TP, tracepoint)
    for name, helper_id in HELPERS.items():
        if base.err:
            missing[name] = f"tp_btf programs refused: {base.describe()}"
            continue
        probe = kernel.probe_prog(
            kernel.BPF_PROG_TYPE_TRACING,
            kernel.BPF_TRACE_RAW_TP,
            tracepoint,
            code=_helper_call(helper_id),
            always_log=True,
        )
        # A helper the kernel does not know, or not for tracing programs: the verifier
        # says so by name; any other complaint (our dummy arguments) means it is there.
        if "invalid func" in probe.full_log or "unknown func" in probe.full_log:
            missing[name] = f"helper #{helper_id} not offered to tracing programs"
    return missing


def _probe_egress() -> str | None:
    """None when the egress controller's cgroup program types load, else which do not."""
    wanted = (
        ("cgroup/connect4", kernel.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, kernel.BPF_CGROUP_INET4_CONNECT),
        ("cgroup/connect6", kernel.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, kernel.BPF_CGROUP_INET6_CONNECT),
        ("sockops", kernel.BPF_PROG_TYPE_SOCK_OPS, kernel.BPF_CGROUP_SOCK_OPS),
        ("cgroup/getsockopt", kernel.BPF_PROG_TYPE_CGROUP_SOCKOPT, kernel.BPF_CGROUP_GETSOCKOPT),
    )
    refused = [
        f"{name}: {probe.describe()}"
        for name, prog_type, attach_type in wanted
        if (probe := kernel.probe_prog(prog_type, attach_type)).err
    ]
    return "; ".join(refused) or None
