"""Which files a process runs code from, and a path that reaches each of them.

/proc/PID/map_files/START-END reaches the very file mapped, even deleted or inside a
container's mount namespace; /proc/PID/root/PATH is the fallback. Files are keyed as the
kernel's uprobes know them (identity.py: on overlayfs, by the layer's file).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flowtap.tls.identity import FileKey, path_key, read_overlays, real_key

__all__ = [
    "FileKey",
    "MappedFile",
    "executable_mappings",
    "file_key",
    "mapped_deleted_files",
    "system_tls_libraries",
]


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


def map_files_name(span: str) -> str:
    """The /proc/PID/map_files entry of a maps address range: the same numbers, without
    the leading zeros maps pads them with ("00400000-006ed000" is "400000-6ed000")."""
    start, _, end = span.partition("-")
    return f"{int(start, 16):x}-{int(end, 16):x}"


def executable_mappings(pid: int, proc: Path = Path("/proc")) -> list[MappedFile]:
    """The files mapped executable in pid, each once; [] when it is gone."""
    try:
        lines = (proc / str(pid) / "maps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    # The process's mounts name its paths; this sensor's, the layers (see real_key).
    theirs = read_overlays(proc / str(pid) / "mountinfo")
    own = read_overlays(proc / "self" / "mountinfo")
    found: dict[FileKey, MappedFile] = {}
    for line in lines:
        parsed = parse_maps_line(line)
        if parsed is None:
            continue
        span, perms, shown, path = parsed
        if "x" not in perms:
            continue
        key = real_key(shown, path, theirs, own)
        if key in found:
            continue
        access = proc / str(pid) / "map_files" / map_files_name(span)
        if not os.path.exists(access):
            access = proc / str(pid) / "root" / path.lstrip("/")
        found[key] = MappedFile(key, path, access)
    return list(found.values())


def mapped_deleted_files(proc: Path = Path("/proc")) -> set[tuple[int, int]]:
    """(device, inode) of every deleted file some process still maps executable, as
    stat() through /proc/PID/map_files sees it (the same view as a descriptor opened
    through it, overlayfs included)."""
    found: set[tuple[int, int]] = set()
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(proc / name / "maps") as maps:
                lines = [line for line in maps if line.endswith(" (deleted)\n")]
        except OSError:
            continue
        for line in lines:
            span, perms, *_ = line.split(maxsplit=2)
            if "x" not in perms:
                continue
            try:
                st = os.stat(proc / name / "map_files" / map_files_name(span))
            except (OSError, ValueError):
                continue
            found.add((st.st_dev, st.st_ino))
    return found


def file_key(path: Path, proc: Path = Path("/proc")) -> FileKey:
    """The key of a file this sensor reaches by path, as executable_mappings keys it."""
    shown = path_key(path, proc)
    return real_key(shown, os.path.realpath(path), read_overlays(proc / "self" / "mountinfo"))


def system_tls_libraries(prefixes: tuple[str, ...]) -> list[Path]:
    """The host's shared TLS libraries (names starting with prefixes, the plug-ins'), from
    the dynamic linker's cache: probed at start, so that programs loading them later are
    covered from their first call."""
    if not prefixes:
        return []
    try:
        out = subprocess.run(
            ["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found: dict[str, Path] = {}
    for line in out.splitlines():
        name, _, target = line.strip().partition(" => ")
        if name.startswith(prefixes) and target:
            found.setdefault(os.path.realpath(target), Path(target))
    return list(found.values())
