"""One identity per file: the inode the kernel's uprobes use.

A uprobe belongs to the inode of the file actually mapped. On overlayfs (the root of
Docker and containerd containers) that is the file in one of the layers, but stat() on
the overlay path names the overlay's device, and so does /proc/PID/maps on kernel 6.18
(older kernels show the layer's device there). So one library appears under several
(device, inode) keys: through each overlay that shows it, and directly.

- `path_key` keys a path as /proc/PID/maps would show it, by mapping it here: whatever
  the kernel version shows there, a path and a mapping of the same file then agree.
- `real_key` maps an overlay's key to the key of the layer file that holds the data
  (the kernel attaches there when given the overlay path), when the layers can be
  reached from here.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FileKey = tuple[int, int, int]  # device major, minor, inode

# Nested overlays (an overlay whose layers are on another overlay) are followed this deep.
_MAX_DEPTH = 4
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Overlay:
    device: tuple[int, int]
    root: str  # the directory of the overlay this mount shows (mountinfo field 4)
    mount_point: str  # where, as the namespace whose mountinfo was read sees it
    layers: tuple[str, ...]  # upperdir, then the lowerdirs: the order the kernel looks in

    def names(self, path: str) -> list[str]:
        """Where path may be inside the overlay, most likely first: below this mount
        point, then each ending of path. (A maps path is written from the root of the
        process's mount namespace, which a chrooted sensor or process does not share.)"""
        parts = [part for part in path.split("/") if part]
        below = self.mount_point.rstrip("/") + "/"
        exact = [path[len(below) :]] if path.startswith(below) else []
        tails = ["/".join(parts[i:]) for i in range(len(parts))]
        return list(dict.fromkeys(os.path.join(self.root, n).lstrip("/") for n in exact + tails))


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def _split(text: str, separator: str) -> list[str]:
    """Splits at separators that no backslash escapes (overlayfs escapes ',' and ':' in
    layer paths)."""
    return re.split(r"(?<!\\)" + re.escape(separator), text)


def _path(escaped: str) -> str:
    return re.sub(r"\\([,:\\])", r"\1", escaped)


def _layers(options: str) -> tuple[str, ...]:
    upper: list[str] = []
    lower: list[str] = []
    for option in _split(options, ","):
        name, _, value = option.partition("=")
        if name == "upperdir":
            upper = [_path(value)]
        elif name == "lowerdir":
            lower += [_path(layer) for layer in _split(value, ":") if layer]  # "::" data-only
        elif name == "lowerdir+":
            lower.append(_path(value))
    return tuple(upper + lower)


def parse_overlays(mountinfo: str) -> list[Overlay]:
    """The overlay mounts in a /proc/PID/mountinfo text, with their layers."""
    found: list[Overlay] = []
    for line in mountinfo.splitlines():
        mount, separator, source = line.partition(" - ")
        fields, super_fields = mount.split(), source.split()
        if not separator or len(fields) < 5 or len(super_fields) < 3:
            continue
        if super_fields[0] != "overlay":
            continue
        major, _, minor = fields[2].partition(":")
        try:
            device = (int(major), int(minor))
        except ValueError:
            continue
        layers = _layers(_unescape(super_fields[2]))
        if layers:
            found.append(Overlay(device, _unescape(fields[3]), _unescape(fields[4]), layers))
    return found


def stat_key(st: os.stat_result) -> FileKey:
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _same_inode(overlay_ino: int, real_ino: int) -> bool:
    """overlayfs reports a file's inode number as the layer's own, with the layer's
    index in the high bits when it has to (xino): the low 32 bits always agree."""
    return overlay_ino & 0xFFFFFFFF == real_ino & 0xFFFFFFFF


def _layer_file(key: FileKey, path: str, overlay: Overlay) -> tuple[FileKey, str] | None:
    """The key and path of the layer file that holds path's data, as the kernel finds
    it: in the first layer that has the name. Only a file with key's inode number is
    taken, so a wrong guess at the name finds nothing."""
    for name in overlay.names(path):
        for layer in overlay.layers:
            candidate = os.path.join(layer, name)
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and _same_inode(key[2], st.st_ino):
                return stat_key(st), candidate
            break  # a whiteout, or another file: it hides this name in the layers below
    return None


def real_key(
    key: FileKey, path: str, overlays: Sequence[Overlay], own: Sequence[Overlay] = ()
) -> FileKey:
    """The key of the file the kernel maps for `key`: the layer file's when key is an
    overlay's, key itself otherwise (or when the layers cannot be read from here).

    path is where the file was seen (a maps line, a path on this host); `overlays` are
    the mounts of the namespace that path belongs to, `own` this sensor's, tried too
    (layer paths are written as the mounting namespace, usually the host's, sees them).
    """
    if not any(overlay.device == key[:2] for overlay in (*overlays, *own)):
        return key
    return _real_key(key, path, tuple(overlays), tuple(own))


@functools.lru_cache(maxsize=4096)  # image layers do not change; rescans come often
def _real_key(
    key: FileKey, path: str, overlays: tuple[Overlay, ...], own: tuple[Overlay, ...]
) -> FileKey:
    for _ in range(_MAX_DEPTH):
        for overlay in (*overlays, *own):
            if overlay.device != key[:2]:
                continue
            found = _layer_file(key, path, overlay)
            if found is not None:
                key, path = found
                overlays = ()  # a layer path is this sensor's: only its own mounts next
                break
        else:
            return key
    return key


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
)  # fmt: skip
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _maps_key(address: int, maps: str) -> FileKey | None:
    """The key /proc/self/maps shows for the mapping that starts at address."""
    start = f"{address:x}-"
    for line in maps.splitlines():
        if line.startswith(start):
            major, _, minor = line.split()[3].partition(":")
            return int(major, 16), int(minor, 16), int(line.split()[4])
    return None


def path_key(path: Path, proc: Path = Path("/proc")) -> FileKey:
    """The key of the file at path, as /proc/PID/maps shows it when a process maps that
    file (one page, read-only, here and at once unmapped); stat()'s when it cannot be
    mapped (an empty file). Raises OSError when there is no such file."""
    with open(path, "rb") as file:
        shown = stat_key(os.fstat(file.fileno()))
        address = _libc.mmap(
            None, mmap.PAGESIZE, mmap.PROT_READ, mmap.MAP_PRIVATE, file.fileno(), 0
        )
        if address in (None, _MAP_FAILED):
            return shown
        try:
            mapped = _maps_key(address, (proc / "self" / "maps").read_text())
        finally:
            _libc.munmap(address, mmap.PAGESIZE)
    return mapped if mapped is not None else shown


def read_overlays(mountinfo: Path) -> list[Overlay]:
    try:
        return parse_overlays(mountinfo.read_text())
    except OSError:
        return []
