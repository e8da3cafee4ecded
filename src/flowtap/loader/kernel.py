"""Raw probes of the running kernel: BTF type ids from /sys/kernel/btf/vmlinux, and tiny
programs and maps loaded with the bpf(2) syscall. Nothing here guesses from the kernel
version: distributions backport and disable features freely.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

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
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_F_QUERY_EFFECTIVE = 1
BPF_LINK_CREATE = 28
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
BPF_PROG_TYPE_KPROBE = 2
BPF_TRACE_UPROBE_MULTI = 48
BPF_F_UPROBE_MULTI_RETURN = 1
_ATTR_SIZE = 128
# mov r0, 0; exit
PROG_RET0 = bytes.fromhex("b700000000000000") + bytes.fromhex("9500000000000000")
_LOG_SIZE = 1 << 16


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
class Probe:
    err: int  # 0 when the kernel accepted it
    log: str = ""  # the verifier's last line on failure, if any
    full_log: str = ""  # everything the verifier said (when asked for a log)

    def describe(self) -> str:
        name = errno.errorcode.get(self.err, str(self.err))
        text = f"{os.strerror(self.err)} ({name})"
        return f"{text}: {self.log}" if self.log else text


def probe_map(map_type: int, max_entries: int) -> Probe:
    """Create and close a map with zero key/value size (as ring buffers require)."""
    fd, err = _bpf(BPF_MAP_CREATE, _attr([(0, "I", map_type), (12, "I", max_entries)]))
    if fd >= 0:
        os.close(fd)
    return Probe(err)


def probe_prog(
    prog_type: int,
    attach_type: int = 0,
    attach_btf_id: int = 0,
    *,
    code: bytes = PROG_RET0,
    always_log: bool = False,
) -> Probe:
    """Load and close a program (`mov r0,0; exit` unless given); on failure (or when
    asked) load it with a log, to say why."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    fields = [
        (0, "I", prog_type),
        (4, "I", len(code) // 8),
        (8, "Q", ctypes.addressof(insns)),
        (16, "Q", ctypes.addressof(license_)),
        (68, "I", attach_type),
        (108, "I", attach_btf_id),
    ]
    logged = [(24, "I", 1), (28, "I", _LOG_SIZE), (32, "Q", ctypes.addressof(log))]
    fd, err = _bpf(BPF_PROG_LOAD, _attr(fields + logged if always_log else fields))
    if fd < 0 and err not in (errno.EPERM, errno.ENOSYS) and not always_log:
        fd, err = _bpf(BPF_PROG_LOAD, _attr(fields + logged))
    text = log.value.decode(errors="replace")
    if fd >= 0:
        os.close(fd)
        return Probe(0, full_log=text)
    # The verifier ends with a "processed N insns" summary; the reason is the line before it.
    lines = [
        line for line in text.splitlines() if line.strip() and not line.startswith("processed ")
    ]
    return Probe(err, lines[-1].strip() if lines else "", text)


def attached_programs(cgroup: str, attach_type: int) -> int:
    """How many programs are attached to a cgroup for one attach type (BPF_PROG_QUERY),
    or -errno. Asked directly: bpftool 7.1 lists none on 5.10 kernels."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        attr = _attr([(0, "I", fd), (4, "I", attach_type)])
        ret, err = _bpf(BPF_PROG_QUERY, attr)
    finally:
        os.close(fd)
    if ret < 0:
        return -err
    return int(struct.unpack_from("=I", attr, 24)[0])


def cgroup_program_ids(cgroup: str, attach_type: int, *, effective: bool = False) -> list[int]:
    """Ids of the programs attached to a cgroup for one attach type; ``effective``: those
    that run for its sockets, inherited from its ancestors included. OSError on failure."""
    most = 64  # the kernel allows 64 programs per cgroup and attach type
    ids = (ctypes.c_uint32 * most)()
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        attr = _attr(
            [
                (0, "I", fd),
                (4, "I", attach_type),
                (8, "I", BPF_F_QUERY_EFFECTIVE if effective else 0),
                (16, "Q", ctypes.addressof(ids)),
                (24, "I", most),
            ]
        )
        ret, err = _bpf(BPF_PROG_QUERY, attr)
    finally:
        os.close(fd)
    if ret < 0:
        raise OSError(err, os.strerror(err))
    count = min(int(struct.unpack_from("=I", attr, 24)[0]), most)
    return [int(ids[i]) for i in range(count)]


def program_name(prog_id: int) -> str | None:
    """A loaded program's name (bpf_prog_info.name, 15 characters at most), or None when
    it is gone or cannot be asked about."""
    fd, _ = _bpf(BPF_PROG_GET_FD_BY_ID, _attr([(0, "I", prog_id)]))
    if fd < 0:
        return None
    try:
        info = ctypes.create_string_buffer(96)  # up to bpf_prog_info.name and a bit
        ret, _ = _bpf(
            BPF_OBJ_GET_INFO_BY_FD,
            _attr([(0, "I", fd), (4, "I", len(info)), (8, "Q", ctypes.addressof(info))]),
        )
    finally:
        os.close(fd)
    if ret < 0:
        return None
    return info.raw[64:80].split(b"\0", 1)[0].decode("ascii", "replace")


def uprobe_multi_link(
    prog_fd: int, path: str, offsets: Sequence[int], *, retprobe: bool, pid: int
) -> tuple[int, int]:
    """One BPF_TRACE_UPROBE_MULTI link (Linux 6.6) for every offset of one file: (link fd
    or -1, errno). Its release waits for one grace period, where one perf event per
    offset waits for one each (~100 ms apiece here). pid <= 0: every process."""
    path_buf = ctypes.create_string_buffer(path.encode())
    offset_buf = (ctypes.c_uint64 * len(offsets))(*offsets)
    attr = _attr(
        [
            (0, "I", prog_fd),
            (8, "I", BPF_TRACE_UPROBE_MULTI),
            (16, "Q", ctypes.addressof(path_buf)),
            (24, "Q", ctypes.addressof(offset_buf)),
            (48, "I", len(offsets)),
            (52, "I", BPF_F_UPROBE_MULTI_RETURN if retprobe else 0),
            (56, "I", max(pid, 0)),
        ]
    )
    return _bpf(BPF_LINK_CREATE, attr)


def probe_uprobe_multi() -> Probe:
    """Loads the smallest uprobe_multi program and links it to one offset of a memfd.
    Older kernels take the program (they do not check its attach type) but refuse the link."""
    insns = ctypes.create_string_buffer(PROG_RET0, len(PROG_RET0))
    license_ = ctypes.create_string_buffer(b"GPL")
    fields = [
        (0, "I", BPF_PROG_TYPE_KPROBE),
        (4, "I", len(PROG_RET0) // 8),
        (8, "Q", ctypes.addressof(insns)),
        (16, "Q", ctypes.addressof(license_)),
        (68, "I", BPF_TRACE_UPROBE_MULTI),
    ]
    prog, err = _bpf(BPF_PROG_LOAD, _attr(fields))
    if prog < 0:
        return Probe(err, "uprobe program refused")
    try:
        target = os.memfd_create("flowtap-probe", os.MFD_CLOEXEC)
        try:
            os.ftruncate(target, 4096)
            link, err = uprobe_multi_link(
                prog, f"/proc/self/fd/{target}", [0], retprobe=False, pid=0
            )
        finally:
            os.close(target)
    finally:
        os.close(prog)
    if link >= 0:
        os.close(link)
        return Probe(0)
    return Probe(err, "BPF_TRACE_UPROBE_MULTI links refused (Linux 6.6)")
