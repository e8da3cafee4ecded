"""`flowtap check`: probe the running kernel for what the sensor needs and say how to fix gaps.

Features are probed for real (tiny programs and maps loaded with the raw bpf(2) syscall, BTF
parsed from /sys/kernel/btf/vmlinux), never guessed from the kernel version: distributions
backport and disable features freely.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from flowtap.java import AGENT_JAR, SHIM
from flowtap.java.probing import java_files_missing
from flowtap.loader import hooks
from flowtap.loader.errors import BpfError
from flowtap.loader.features import FEATURES, KernelFeatures
from flowtap.loader.kernel import (
    BPF_MAP_TYPE_RINGBUF,
    BTF_KIND_TYPEDEF,
    VMLINUX_BTF,
    BtfError,
    find_btf_ids,
    probe_map,
)
from flowtap.loader.libbpf import BpfObject
from flowtap.loader.system import bpf_object_path

TRACEFS_MOUNTPOINTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
MOUNT_TRACEFS = "mount -t tracefs tracefs /sys/kernel/tracing"
RUN_AS_ROOT = "run as root (sudo flowtap check)"
NOT_ROOT = "cannot probe: not root"


@dataclass(frozen=True)
class Check:
    """One probed feature: `ok` says whether it is usable, `fix` how to make it so."""

    name: str
    ok: bool
    required: bool
    detail: str
    fix: str | None = None


# ---------------------------------------------------------------------------------------------
# /proc and /sys helpers


def _unescape_mount(field: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(path: str = "/proc/self/mounts") -> list[tuple[str, str]]:
    """(mount point, fs type) for every mount, in mount order."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return [
        (_unescape_mount(parts[1]), parts[2])
        for parts in (line.split() for line in lines)
        if len(parts) >= 3
    ]


def _tracefs_mount(mounts: list[tuple[str, str]]) -> str | None:
    points = {point for point, fstype in mounts if fstype == "tracefs"}
    return next((p for p in TRACEFS_MOUNTPOINTS if p in points), None)


def check_root() -> Check:
    euid = os.geteuid()
    if euid == 0:
        return Check("root", True, True, "effective uid 0")
    detail = f"effective uid {euid}; loading BPF programs needs root"
    return Check("root", False, True, detail, RUN_AS_ROOT)


def check_libbpf() -> Check:
    try:
        lib = ctypes.CDLL("libbpf.so.1")
    except OSError as exc:
        fix = "install libbpf 1.x (Debian: apt-get install libbpf1)"
        return Check("libbpf", False, True, f"libbpf.so.1 not loadable: {exc}", fix)
    try:
        version = f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"
    except AttributeError:  # symbols arrived in libbpf 0.6; a .so.1 always has them
        version = "unknown version"
    return Check("libbpf", True, True, f"libbpf.so.1 loaded (v{version})")


def check_btf() -> Check:
    fix = "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels are)"
    try:
        find_btf_ids([(BTF_KIND_TYPEDEF, "btf_trace_sched_process_exec")])
    except BtfError as exc:
        return Check("btf", False, True, str(exc), fix)
    size_mb = os.path.getsize(VMLINUX_BTF) / 1e6
    return Check("btf", True, True, f"{VMLINUX_BTF} ({size_mb:.1f} MB)")


def check_ringbuf(root: bool) -> Check:
    if not root:
        return Check("ring buffer", False, True, NOT_ROOT, RUN_AS_ROOT)
    probe = probe_map(BPF_MAP_TYPE_RINGBUF, 4096)
    if probe.err == 0:
        return Check("ring buffer", True, True, "BPF_MAP_TYPE_RINGBUF map created")
    fix = "use Linux 5.8 or newer (BPF ring buffer)"
    return Check("ring buffer", False, True, f"map create failed: {probe.describe()}", fix)


# What to do when a capability gets no hook (connections is the one the sensor needs).
_CAPABILITY_FIX = {
    hooks.CONNECTIONS: "use Linux 5.10 or newer with BTF (Debian 11 and later)",
    hooks.BYTE_COUNTS: "use a kernel with fentry (x86_64: every stock kernel) or kprobes",
    hooks.OPENSSL: "use a kernel built with CONFIG_UPROBE_EVENTS=y",
    hooks.GO: "use a kernel built with CONFIG_UPROBE_EVENTS=y",
    hooks.NODE: "use a kernel built with CONFIG_UPROBE_EVENTS=y",
    hooks.JAVA: "use a kernel built with CONFIG_UPROBE_EVENTS=y",
    hooks.EGRESS: "use a kernel with cgroup BPF (CONFIG_CGROUP_BPF); without it, run without "
    "--egress",
    hooks.EXEC_HOLD: "without it, TLS probes reach new programs after they start",
}


def capability_checks(plan: hooks.HookPlan) -> list[Check]:
    """One line per capability: the hook this kernel gets, or why it gets none."""
    checks = []
    for cap in plan.capabilities:
        required = cap.name == hooks.CONNECTIONS
        if cap.available:
            checks.append(Check(cap.name, True, required, f"{cap.hook} ({cap.detail})"))
        else:
            checks.append(
                Check(cap.name, False, required, cap.detail, _CAPABILITY_FIX.get(cap.name))
            )
    return checks


def check_java_agent() -> Check:
    """Java probing needs the agent and its shim built with the sensor (no JDK on the
    host: flowtap speaks HotSpot's attach protocol itself)."""
    missing = java_files_missing()
    if missing is not None:
        return Check("Java agent", False, False, missing, "run `make setup` (its java step)")
    return Check(
        "Java agent",
        True,
        False,
        f"{AGENT_JAR.name} and {SHIM.name}: HotSpot JVMs (Java 11 to 21) get it by dynamic "
        "attach, no JDK needed on the host",
    )


def check_tracefs(mounts: list[tuple[str, str]]) -> Check:
    """Optional: the sensor's programs need no tracefs (BTF tracepoints, fentry, links)."""
    point = _tracefs_mount(mounts)
    if point is not None:
        return Check("tracefs", True, False, f"mounted at {point}")
    detail = "not mounted; flowtap does not need it"
    return Check("tracefs", False, False, detail, f"for other tools: {MOUNT_TRACEFS}")


def check_feature(features: KernelFeatures, feature: str, label: str, used_for: str) -> Check:
    """An optional kernel feature the plan uses where present."""
    if features.has(feature):
        return Check(label, True, False, f"available ({used_for})")
    return Check(label, False, False, features.why_not(feature))


def check_cgroup2(mounts: list[tuple[str, str]]) -> Check:
    point = next((p for p, fstype in mounts if fstype == "cgroup2"), None)
    if point is None:
        fix = "mount -t cgroup2 none /sys/fs/cgroup/unified"
        return Check("cgroup v2", False, False, "no cgroup2 mount", fix)
    hybrid = any(fstype == "cgroup" for _, fstype in mounts)
    layout = "hybrid v1/v2 layout" if hybrid else "unified layout"
    return Check("cgroup v2", True, False, f"mounted at {point} ({layout})")


def read_lockdown(path: str = "/sys/kernel/security/lockdown") -> str | None:
    """The active lockdown mode (the bracketed word), or None when it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def check_lockdown() -> Check:
    mode = read_lockdown()
    if mode is None:
        fix = "mount -t securityfs securityfs /sys/kernel/security to read it"
        detail = "unknown: /sys/kernel/security/lockdown not readable"
        return Check("lockdown", False, False, detail, fix)
    if mode == "confidentiality":
        detail = "confidentiality: BPF reads of kernel memory are denied; some fields may be empty"
        return Check("lockdown", False, False, detail)
    return Check("lockdown", True, False, mode)


def sensor_plan(features: KernelFeatures) -> hooks.HookPlan | None:
    """The plan `flowtap run` would follow here (None without the BPF object)."""
    try:
        obj = BpfObject.open(bpf_object_path("conn.bpf.o"))
    except BpfError:
        return None
    try:
        return hooks.plan(features, [program.name for program in obj.programs()])
    finally:
        obj.close()


def run_checks(avoid: tuple[str, ...] = ()) -> list[Check]:
    """Probe everything: what the sensor needs, then what each capability gets here."""
    root = os.geteuid() == 0
    mounts = read_mounts()
    features = KernelFeatures.probe(avoid)
    checks = [check_root(), check_libbpf(), check_btf(), check_ringbuf(root)]
    plan = sensor_plan(features)
    if plan is None:
        checks.append(
            Check(
                hooks.CONNECTIONS,
                False,
                True,
                "the sensor's BPF object is missing",
                "run `make bpf`",
            )
        )
    else:
        checks += capability_checks(plan)
        if plan.capability(hooks.JAVA).available:
            checks.append(check_java_agent())
    return [
        *checks,
        check_feature(features, "sock-tracepoints", "socket tracepoints", "byte counts"),
        check_feature(features, "fentry", "fentry", "byte counts before 6.3"),
        check_feature(features, "kprobes", "kprobes", "byte counts without fentry"),
        check_feature(features, "uprobes", "uprobes", "TLS plaintext"),
        check_feature(
            features, "uprobe-multi", "uprobe_multi", "fast detach of probes on replaced files"
        ),
        check_feature(
            features, "loop", "bpf_loop", "the full build, with atomics and bpf_for_each_map_elem"
        ),
        check_feature(features, "task-storage", "task storage", "TLS call state"),
        check_feature(features, "atomics", "atomics", "exact positions under races"),
        check_tracefs(mounts),
        check_cgroup2(mounts),
        check_lockdown(),
    ]


# ---------------------------------------------------------------------------------------------
# report

# Marks are escapes so the source stays ASCII-unambiguous: check mark, ballot x, en dash.
MARK_OK, MARK_MISSING, MARK_OPTIONAL = "\u2713", "\u2717", "\u2013"
_GREEN, _RED, _YELLOW, _DIM, _RESET = "\033[32m", "\033[31m", "\033[33m", "\033[2m", "\033[0m"


def _status(check: Check) -> tuple[str, str, str]:
    """(mark, word, colour) for one check."""
    if check.ok:
        return MARK_OK, "ok", _GREEN
    if check.required:
        return MARK_MISSING, "missing", _RED
    return MARK_OPTIONAL, "optional", _YELLOW


def format_report(checks: list[Check], *, color: bool) -> str:
    """One aligned line per check, fixes beneath failures, and a verdict line."""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        mark, word, code = _status(check)
        lines.append(
            f"{paint(mark, code)} {check.name:<{width}}  {paint(f'{word:<8}', code)}  "
            f"{check.detail}"
        )
        if check.fix:
            label = "hint" if check.ok else "fix"
            lines.append(paint(f"  {'':<{width}}  {label:>8}: {check.fix}", _DIM))
    missing = sum(1 for c in checks if c.required and not c.ok)
    lines.append("")
    if missing:
        lines.append(
            paint(
                f"flowtap cannot run: {missing} required feature(s) missing; see the fixes above.",
                _RED,
            )
        )
    else:
        lines.append(paint("flowtap can run on this host.", _GREEN))
    return "\n".join(lines) + "\n"


def _use_color(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _printable(text: str) -> str:
    # A C-locale or redirected stdout may not encode the marks; fall back to ASCII.
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except UnicodeEncodeError:
        return text.translate(str.maketrans(MARK_OK + MARK_MISSING + MARK_OPTIONAL, "+x-"))
    return text


def main(argv: list[str] | None = None) -> int:
    """`flowtap check`: print the report; 0 when every required check passes."""
    parser = argparse.ArgumentParser(
        prog="flowtap check",
        description="Check whether this host's kernel can run the flowtap sensor.",
    )
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the report"
    )
    parser.add_argument(
        "--avoid-kernel-features",
        default=os.environ.get("FLOWTAP_AVOID_KERNEL_FEATURES", ""),
        metavar="LIST",
        help=f"report as if these were missing: {', '.join(FEATURES)}",
    )
    args = parser.parse_args(argv)
    avoid = tuple(n.strip() for n in args.avoid_kernel_features.split(",") if n.strip())
    unknown = sorted(set(avoid) - set(FEATURES))
    if unknown:
        parser.error(
            f"--avoid-kernel-features: unknown {', '.join(unknown)}; use {', '.join(FEATURES)}"
        )
    checks = run_checks(avoid)
    sys.stdout.write(_printable(format_report(checks, color=_use_color(args.color))))
    return 0 if all(c.ok for c in checks if c.required) else 1
