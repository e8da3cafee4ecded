"""Which files a process runs code from, and a path that reaches each of them.

/proc/PID/map_files/START-END reaches the very file mapped, even deleted or inside a
container's mount namespace; /proc/PID/root/PATH is the fallback.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

FileKey = tuple[int, int, int]  # device major, minor, inode


@dataclass(frozen=True, slots=True)
class MappedFile:
    key: FileKey
    path: str  # as the process sees it
    access: Path  # how this sensor opens it and attaches to it


def parse_maps_line(line: str) -> tuple[str, str, FileKey, str] | None:
    """(address range, permissions, file key, path) of a file mapping; None otherwise."""
    parts = line.split(maxsplit=5)
    if len(parts) < 6 or not parts[5].startswith("/"):
        return None
    span, perms, _offset, device, inode_text, path = parts
    try:
        major_text, minor_text = device.split(":")
        inode = int(inode_text)
        key = (int(major_text, 16), int(minor_text, 16), inode)
    except ValueError:
        return None
    if inode == 0:
        return None
    return span, perms, key, path.removesuffix(" (deleted)")


def executable_mappings(pid: int, proc: Path = Path("/proc")) -> list[MappedFile]:
    """The files mapped executable in pid, each once; [] when it is gone."""
    try:
        lines = (proc / str(pid) / "maps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    found: dict[FileKey, MappedFile] = {}
    for line in lines:
        parsed = parse_maps_line(line)
        if parsed is None:
            continue
        span, perms, key, path = parsed
        if "x" not in perms or key in found:
            continue
        access = proc / str(pid) / "map_files" / span
        if not os.path.exists(access):
            access = proc / str(pid) / "root" / path.lstrip("/")
        found[key] = MappedFile(key, path, access)
    return list(found.values())


def file_key(path: Path) -> FileKey:
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def system_tls_libraries() -> list[Path]:
    """The host's shared OpenSSL libraries, from the dynamic linker's cache: probed at
    start, so that programs loading them later are covered from their first call."""
    try:
        out = subprocess.run(
            ["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found: dict[str, Path] = {}
    for line in out.splitlines():
        name, _, target = line.strip().partition(" => ")
        if name.startswith("libssl.so") and target:
            found.setdefault(os.path.realpath(target), Path(target))
    return list(found.values())
