"""What a process is, as a HotSpot JVM: found by the libjvm.so it maps, not by its name.

Everything is read from /proc (as root); a process that exits while we read is simply not
a JVM. Paths inside the target (java_home) are as the target sees them, in its own mount
namespace; they are read through /proc/PID/root.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Jvm", "attach_supported", "catches_sigquit", "find_jvm", "read_status"]

SIGQUIT = 3
# The VM flavours HotSpot ships (JDK 9+ layout: <home>/lib/<flavour>/libjvm.so; JDK 8:
# <home>/lib/<arch>/<flavour>/libjvm.so, the home being the jre directory).
_LIBJVM = re.compile(r"^(?P<home>/.*?)/lib(?:/[^/]+)?/(?:server|client|zero)/libjvm\.so$")
_RELEASE_MAX = 64 * 1024  # a release file is a few hundred bytes; read no more than this
_VERSION = re.compile(r'^JAVA_VERSION="([^"\n]{1,64})"', re.MULTILINE)
# HotSpot's performance data (hsperfdata), a file each JVM maps unless -XX:-UsePerfData.
_PERFDATA = re.compile(r"/hsperfdata_[^/]+/(\d+)$")
_PERFDATA_MAX = 4 << 20  # PerfDataMemorySize is 64 KiB by default
_PROLOGUE = struct.Struct("<4sbbbbiiqii")  # magic, byte order, versions, ..., entries
_ENTRY = struct.Struct("<iiibbbbi")  # length, name offset, vector length, type, ..., data
_MAGIC = bytes.fromhex("cafec0c0")


@dataclass(frozen=True, slots=True)
class Jvm:
    pid: int  # in our pid namespace
    nspid: int  # in its own pid namespace: the number in .java_pid<N> and .attach_pid<N>
    uid: int  # effective, as seen from our user namespace
    gid: int
    java_home: str  # as the target sees it
    root: str  # /proc/PID/root: the target's / from here
    version: str | None  # JAVA_VERSION of <java_home>/release, None if unreadable
    sigquit_caught: bool  # whether its SIGQUIT handler is installed yet (SigCgt)

    @property
    def major(self) -> int | None:
        """The feature release (8 for "1.8.0_392", 17 for "17.0.9"), None if unknown."""
        if self.version is None:
            return None
        parts = self.version.split(".")
        try:
            first = int(parts[0])
            return int(parts[1]) if first == 1 and len(parts) > 1 else first
        except ValueError:
            return None


def read_status(pid: int) -> dict[str, str] | None:
    """/proc/PID/status as a dict, None if the process is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def catches_sigquit(pid: int) -> bool:
    """Whether the process has a handler for SIGQUIT now (else SIGQUIT would kill it)."""
    status = read_status(pid)
    return status is not None and _sigquit_caught(status)


def _sigquit_caught(status: dict[str, str]) -> bool:
    try:
        mask = int(status.get("SigCgt", "0"), 16)
    except ValueError:
        return False
    return bool(mask & (1 << (SIGQUIT - 1)))


def _mappings(pid: int) -> Iterator[tuple[str, str]]:
    """(address range, path) of each file mapping in /proc/PID/maps; OSError when gone."""
    with open(f"/proc/{pid}/maps", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                yield fields[0], fields[5].rstrip("\n").removesuffix(" (deleted)")


def _java_home(pid: int) -> str | None:
    try:
        for _span, path in _mappings(pid):
            match = _LIBJVM.match(path)
            if match:
                return match.group("home")
    except OSError:
        return None
    return None


def _read_version(pid: int, java_home: str) -> str | None:
    """JAVA_VERSION from <java_home>/release in the target's root. The target's files are
    not trusted: the file must be a regular file (no FIFO to block on), read bounded."""
    path = f"/proc/{pid}/root{java_home}/release"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _RELEASE_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)
    match = _VERSION.search(data.decode("utf-8", errors="replace"))
    return match.group(1) if match else None


def _perfdata(pid: int, nspid: int) -> bytes | None:
    """The JVM's hsperfdata, read through the mapping itself (/proc/PID/map_files: the
    file it maps, whatever has been renamed or planted at its path since)."""
    try:
        for span, path in _mappings(pid):
            match = _PERFDATA.search(path)
            if match and int(match.group(1)) == nspid:
                with open(f"/proc/{pid}/map_files/{span}", "rb") as mapped:
                    return mapped.read(_PERFDATA_MAX)
    except (OSError, ValueError):
        return None
    return None


def _perf_entries(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """hsperfdata's entries: (name, type code, value bytes); strings are byte vectors
    ("B"), counters scalar longs ("J"). Nothing for a file that is not one."""
    magic, order, *_rest, entry_offset, entries = _PROLOGUE.unpack_from(data)
    if magic != _MAGIC or order != 1:  # 1: little-endian, as on every Linux HotSpot runs
        return
    offset = entry_offset
    for _ in range(min(entries, 10000)):
        length, name_at, vector, kind, _f, _u, _v, data_at = _ENTRY.unpack_from(data, offset)
        if length <= 0 or offset + length > len(data):
            return
        name_end = data.find(b"\0", offset + name_at, offset + length)
        if name_end > 0:
            name = data[offset + name_at : name_end].decode("ascii", errors="replace")
            size = vector if vector > 0 else 8
            yield name, kind, data[offset + data_at : min(offset + data_at + size, offset + length)]
        offset += length


def _perf_strings(data: bytes) -> dict[str, bytes]:
    """The byte-vector (string) entries of hsperfdata: name -> value (up to its NUL)."""
    return {
        name: value.split(b"\0", 1)[0]
        for name, kind, value in _perf_entries(data)
        if kind == ord("B") and value
    }


def _perf_long(data: bytes, wanted: str) -> int | None:
    """A long (scalar) entry of hsperfdata, None when absent."""
    for name, kind, value in _perf_entries(data):
        if name == wanted and kind == ord("J") and len(value) == 8:
            return int.from_bytes(value, "little", signed=True)
    return None


def vm_started(jvm: Jvm) -> bool | None:
    """Whether the JVM finished starting (sun.rt.createVmEndTime is set): an agent loaded
    earlier finds no system class loader yet. None when it has no hsperfdata."""
    data = _perfdata(jvm.pid, jvm.nspid)
    if data is None:
        return None
    try:
        ended = _perf_long(data, "sun.rt.createVmEndTime")
    except struct.error:
        return None
    return None if ended is None else ended != 0


def attach_supported(jvm: Jvm) -> bool | None:
    """Whether the JVM has its attach mechanism (not -XX:+DisableAttachMechanism), as its
    hsperfdata says (sun.rt.jvmCapabilities, as jps reads it); None if it has none."""
    data = _perfdata(jvm.pid, jvm.nspid)
    if data is None:
        return None
    try:
        capabilities = _perf_strings(data).get("sun.rt.jvmCapabilities")
    except struct.error:  # a truncated or foreign file
        return None
    if not capabilities:
        return None
    return capabilities[:1] == b"1"


def _ids(status: dict[str, str]) -> tuple[int, int, int] | None:
    """(nspid, euid, egid) from a status dict."""
    try:
        nspid = int(status["NSpid"].split()[-1]) if "NSpid" in status else int(status["Pid"])
        euid = int(status["Uid"].split()[1])
        egid = int(status["Gid"].split()[1])
    except (KeyError, IndexError, ValueError):
        return None
    return nspid, euid, egid


def find_jvm(pid: int) -> Jvm | None:
    """The JVM process pid is, or None: not a HotSpot JVM (no libjvm.so mapped, whatever
    its name), gone, or unreadable."""
    java_home = _java_home(pid)
    if java_home is None:
        return None
    status = read_status(pid)
    if status is None:
        return None
    ids = _ids(status)
    if ids is None:
        return None
    nspid, uid, gid = ids
    return Jvm(
        pid=pid,
        nspid=nspid,
        uid=uid,
        gid=gid,
        java_home=java_home,
        root=f"/proc/{pid}/root",
        version=_read_version(pid, java_home),
        sigquit_caught=_sigquit_caught(status),
    )
