"""`flowtap check`: probe the running kernel for what the sensor needs and say how to fix gaps.

Features are probed for real (tiny programs and maps loaded with the raw bpf(2) syscall, BTF
parsed from /sys/kernel/btf/vmlinux), never guessed from the kernel version: distributions
backport and disable features freely.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import os
import platform
import re
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flowtap.loader.errors import BpfError
from flowtap.loader.libbpf import BpfObject
from flowtap.loader.system import bpf_object_path

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
TRACEFS_MOUNTPOINTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
MOUNT_TRACEFS = "mount -t tracefs tracefs /sys/kernel/tracing"
RUN_AS_ROOT = "run as root (sudo flowtap check)"
NOT_ROOT = "cannot probe: not root"

# Any one of these is enough to try an fentry load; tcp_connect exists on every TCP kernel.
FENTRY_CANDIDATES = ("tcp_connect", "tcp_v4_connect", "do_sys_openat2")

# BTF kinds we look up (include/uapi/linux/btf.h).
BTF_KIND_STRUCT = 4
BTF_KIND_TYPEDEF = 8
BTF_KIND_FUNC = 12
# Bytes that follow the 12-byte btf_type header: fixed per kind, or per vlen entry.
_BTF_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG
_BTF_VLEN_EXTRA = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # STRUCT UNION ENUM PROTO DATASEC E64

# bpf(2) ABI.
_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23
BPF_TRACE_FENTRY = 24
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_GETSOCKOPT = 21
_ATTR_SIZE = 128
# mov r0, 0; exit
_PROG_RET0 = bytes.fromhex("b700000000000000") + bytes.fromhex("9500000000000000")
_LOG_SIZE = 1 << 16


@dataclass(frozen=True)
class Check:
    """One probed feature: `ok` says whether it is usable, `fix` how to make it so."""

    name: str
    ok: bool
    required: bool
    detail: str
    fix: str | None = None


# ---------------------------------------------------------------------------------------------
# BTF


class BtfError(Exception):
    """vmlinux BTF is absent or not something we can parse."""


def find_btf_ids(
    wanted: Iterable[tuple[int, str]], path: str = VMLINUX_BTF
) -> dict[tuple[int, str], int]:
    """Map each wanted (kind, name) to its BTF type id; names not present are left out.

    One pass over the type section that stops once everything is found. Names are matched by
    string-table offset (the table is deduplicated), so the walk never decodes a string.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BtfError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) < 24:
        raise BtfError(f"{path}: too short for a BTF header")
    if struct.unpack_from("<H", data)[0] == 0xEB9F:
        end = "<"
    elif struct.unpack_from(">H", data)[0] == 0xEB9F:
        end = ">"
    else:
        raise BtfError(f"{path}: bad BTF magic")
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(end + "5I", data, 4)
    types_at, strs_at = hdr_len + type_off, hdr_len + str_off
    strings = data[strs_at : strs_at + str_len]

    by_offset: dict[int, list[tuple[int, str]]] = {}
    for kind, name in set(wanted):
        at = strings.find(b"\0" + name.encode() + b"\0")
        if at >= 0:
            by_offset.setdefault(at + 1, []).append((kind, name))
    remaining = sum(len(v) for v in by_offset.values())

    found: dict[tuple[int, str], int] = {}
    header = struct.Struct(end + "II")
    pos, stop, type_id = types_at, types_at + type_len, 1
    while pos < stop and remaining:
        name_off, info = header.unpack_from(data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        for key in by_offset.get(name_off, ()):
            if key[0] == kind and key not in found:
                found[key] = type_id
                remaining -= 1
        pos += 12 + _BTF_FIXED_EXTRA.get(kind, 0) + _BTF_VLEN_EXTRA.get(kind, 0) * vlen
        type_id += 1
    return found


@functools.cache
def sensor_hooks() -> tuple[str, ...]:
    """The tp_btf tracepoints the sensor attaches, read from the program sections of its
    BPF object, so this check never drifts from what `flowtap run` loads."""
    try:
        obj = BpfObject.open(bpf_object_path("conn.bpf.o"))
    except BpfError:
        return ()
    try:
        sections = [program.section for program in obj.programs()]
    finally:
        obj.close()
    return tuple(s.split("/", 1)[1] for s in sections if s.startswith("tp_btf/"))


def _tp_btf_typedef(target: str) -> str:
    return "btf_trace_" + target


def _wanted_btf() -> list[tuple[int, str]]:
    wanted = [(BTF_KIND_TYPEDEF, _tp_btf_typedef(t)) for t in sensor_hooks()]
    wanted += [(BTF_KIND_FUNC, f) for f in FENTRY_CANDIDATES]
    return wanted


@functools.cache
def _vmlinux_ids() -> dict[tuple[int, str], int]:
    # Every check shares one walk of the ~6 MB blob.
    return find_btf_ids(_wanted_btf())


# ---------------------------------------------------------------------------------------------
# bpf(2)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> tuple[int, int]:
    """Run bpf(cmd, attr); return (fd or -1, errno)."""
    nr = _BPF_SYSCALL_NR.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    ret = _libc().syscall(
        ctypes.c_long(nr), ctypes.c_long(cmd), attr, ctypes.c_long(ctypes.sizeof(attr))
    )
    return (int(ret), 0) if ret >= 0 else (-1, ctypes.get_errno())


def _attr(fields: Sequence[tuple[int, str, int]]) -> ctypes.Array[ctypes.c_char]:
    # The kernel rejects non-zero bytes past the fields it knows, so start from zeroes.
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into("=" + fmt, attr, offset, value)
    return attr


@dataclass(frozen=True)
class _Probe:
    err: int  # 0 when the kernel accepted it
    log: str = ""  # first verifier line on failure, if any

    def describe(self) -> str:
        name = errno.errorcode.get(self.err, str(self.err))
        text = f"{os.strerror(self.err)} ({name})"
        return f"{text}: {self.log}" if self.log else text


def probe_map(map_type: int, max_entries: int) -> _Probe:
    """Create and close a map with zero key/value size (as ring buffers require)."""
    fd, err = _bpf(BPF_MAP_CREATE, _attr([(0, "I", map_type), (12, "I", max_entries)]))
    if fd >= 0:
        os.close(fd)
    return _Probe(err)


def probe_prog(prog_type: int, attach_type: int = 0, attach_btf_id: int = 0) -> _Probe:
    """Load and close `mov r0,0; exit`; on failure retry with a log to explain why."""
    insns = ctypes.create_string_buffer(_PROG_RET0, len(_PROG_RET0))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    fields = [
        (0, "I", prog_type),
        (4, "I", len(_PROG_RET0) // 8),
        (8, "Q", ctypes.addressof(insns)),
        (16, "Q", ctypes.addressof(license_)),
        (68, "I", attach_type),
        (108, "I", attach_btf_id),
    ]
    fd, err = _bpf(BPF_PROG_LOAD, _attr(fields))
    if fd < 0 and err not in (errno.EPERM, errno.ENOSYS):
        logged = [(24, "I", 1), (28, "I", _LOG_SIZE), (32, "Q", ctypes.addressof(log))]
        fd, err = _bpf(BPF_PROG_LOAD, _attr(fields + logged))
    if fd >= 0:
        os.close(fd)
        return _Probe(0)
    # The verifier ends with a "processed N insns" summary; the reason is the line before it.
    lines = [
        line
        for line in log.value.decode(errors="replace").splitlines()
        if line.strip() and not line.startswith("processed ")
    ]
    return _Probe(err, lines[-1].strip() if lines else "")


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
        _vmlinux_ids()
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


def check_tp_btf(root: bool) -> Check:
    """Load a tp_btf program against every tracepoint the sensor attaches to."""
    if not root:
        return Check("tp_btf", False, True, NOT_ROOT, RUN_AS_ROOT)
    try:
        ids = _vmlinux_ids()
    except BtfError:
        return Check("tp_btf", False, True, "cannot probe: no vmlinux BTF", "see the btf check")
    targets = sensor_hooks()
    if not targets:
        return Check("tp_btf", False, True, "the sensor's BPF object is missing", "run `make bpf`")
    problems = []
    for target in targets:
        btf_id = ids.get((BTF_KIND_TYPEDEF, _tp_btf_typedef(target)))
        if btf_id is None:
            problems.append(f"{target}: tracepoint not in this kernel")
            continue
        probe = probe_prog(BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP, btf_id)
        if probe.err:
            problems.append(f"{target}: load failed: {probe.describe()}")
    if not problems:
        return Check("tp_btf", True, True, f"loads on all {len(targets)} tracepoints")
    fix = "use a kernel that has these tracepoints and BTF-enabled raw tracepoints (tp_btf)"
    return Check("tp_btf", False, True, "; ".join(problems), fix)


def check_tracefs(mounts: list[tuple[str, str]]) -> Check:
    """Optional: the sensor's programs are all BTF tracepoints, which need no tracefs."""
    point = _tracefs_mount(mounts)
    if point is not None:
        return Check("tracefs", True, False, f"mounted at {point}")
    detail = "not mounted; flowtap does not need it (tp_btf programs only)"
    return Check("tracefs", False, False, detail, f"for other tools: {MOUNT_TRACEFS}")


def check_fentry(root: bool) -> Check:
    if not root:
        return Check("fentry", False, False, NOT_ROOT, RUN_AS_ROOT)
    try:
        ids = _vmlinux_ids()
    except BtfError:
        return Check("fentry", False, False, "cannot probe: no vmlinux BTF")
    func = next((f for f in FENTRY_CANDIDATES if (BTF_KIND_FUNC, f) in ids), None)
    if func is None:
        return Check("fentry", False, False, "no probe target function in kernel BTF")
    probe = probe_prog(BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, ids[(BTF_KIND_FUNC, func)])
    if probe.err == 0:
        return Check("fentry", True, False, f"loads on {func}")
    if probe.err == errno.EPERM:
        detail = (
            "refused by the kernel (EPERM): lockdown or policy; flowtap uses tracepoints instead"
        )
        return Check("fentry", False, False, detail)
    detail = f"load failed: {probe.describe()}; flowtap uses tracepoints instead"
    return Check("fentry", False, False, detail)


def check_kprobes(mounts: list[tuple[str, str]]) -> Check:
    if os.path.exists("/sys/bus/event_source/devices/kprobe/type"):
        return Check("kprobes", True, False, "kprobe PMU present")
    point = _tracefs_mount(mounts)
    # os.path.exists, not Path.exists: tracefs is root-only and Path.exists raises EACCES.
    if point is not None and os.path.exists(os.path.join(point, "kprobe_events")):
        # Legacy tracefs interface without the PMU: usable, just older.
        return Check("kprobes", True, False, f"via {point}/kprobe_events")
    detail = "not compiled in (CONFIG_KPROBES unset); flowtap does not need them"
    return Check("kprobes", False, False, detail)


def check_uprobes() -> Check:
    if os.path.exists("/sys/bus/event_source/devices/uprobe/type"):
        return Check("uprobes", True, False, "uprobe PMU present")
    detail = "not available (CONFIG_UPROBE_EVENTS unset); only the TLS features need them"
    return Check("uprobes", False, False, detail, "use a kernel built with CONFIG_UPROBE_EVENTS=y")


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


def check_egress(root: bool) -> Check:
    """Optional: the program types the egress controller (--egress) attaches to a cgroup."""
    if not root:
        return Check("egress", False, False, NOT_ROOT, RUN_AS_ROOT)
    wanted = (
        ("cgroup/connect4", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
        ("cgroup/connect6", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_CONNECT),
        ("sockops", BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS),
        ("cgroup/getsockopt", BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_CGROUP_GETSOCKOPT),
    )
    refused = [
        f"{name}: {probe.describe()}"
        for name, prog_type, attach_type in wanted
        if (probe := probe_prog(prog_type, attach_type)).err
    ]
    if not refused:
        return Check("egress", True, False, "cgroup connect4/6, sockops and getsockopt load")
    fix = "use a kernel with cgroup BPF (CONFIG_CGROUP_BPF); without it, run without --egress"
    return Check("egress", False, False, "; ".join(refused), fix)


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


def run_checks() -> list[Check]:
    """Probe everything, required checks first."""
    root = os.geteuid() == 0
    mounts = read_mounts()
    return [
        check_root(),
        check_libbpf(),
        check_btf(),
        check_ringbuf(root),
        check_tp_btf(root),
        check_tracefs(mounts),
        check_fentry(root),
        check_kprobes(mounts),
        check_uprobes(),
        check_cgroup2(mounts),
        check_egress(root),
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
    args = parser.parse_args(argv)
    checks = run_checks()
    sys.stdout.write(_printable(format_report(checks, color=_use_color(args.color))))
    return 0 if all(c.ok for c in checks if c.required) else 1
