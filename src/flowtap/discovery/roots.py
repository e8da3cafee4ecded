"""A process's root (a container, a chroot): which one it is, and its libssl files.

A private root brings its own libssl, which no process had mapped when the sensor
started. At the first exec seen in a new root, its library directories and its dynamic
linker's cache are searched, and each file is opened inside that root with openat2's
RESOLVE_IN_ROOT: an absolute symlink in a container resolves in the container, never on
the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import struct
from collections.abc import Iterator

RootKey = tuple[int, int, int]  # mount namespace inode, root directory device and inode

_SYS_OPENAT2 = 437  # the same number on every architecture (new syscalls are unified)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_LIBRARY_DIRS = (
    "lib",
    "lib64",
    "usr/lib",
    "usr/lib64",
    "usr/local/lib",
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
)
_LD_CACHE = "etc/ld.so.cache"
# A path in the cache: any printable run ending in a NUL (the names are filtered after).
_LD_CACHE_PATH = re.compile(rb"(/[\x21-\x7e]{1,200})\0")
_MAX_LD_CACHE_BYTES = 8 << 20
_MAX_LIBRARIES = 32
_libc = ctypes.CDLL(None, use_errno=True)


def root_key(pid: int) -> RootKey | None:
    """Which root pid runs in; None when it is gone."""
    try:
        namespace = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        root = os.stat(f"/proc/{pid}/root")
    except OSError:
        return None
    return namespace, root.st_dev, root.st_ino


def open_in_root(root_fd: int, path: str, flags: int = os.O_RDONLY) -> int:
    """openat2(root_fd, path, RESOLVE_IN_ROOT): path resolved as if root_fd were "/"."""
    how = struct.pack("=QQQ", flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, os.fsencode(path.lstrip("/") or "."), how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _ld_cache_paths(root_fd: int, prefixes: tuple[str, ...]) -> list[str]:
    try:
        fd = open_in_root(root_fd, _LD_CACHE)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as stream:
        data = stream.read(_MAX_LD_CACHE_BYTES)
    paths = (match.decode() for match in _LD_CACHE_PATH.findall(data))
    return [path for path in paths if path.rpartition("/")[2].startswith(prefixes)]


def _directory_paths(root_fd: int, prefixes: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for directory in _LIBRARY_DIRS:
        try:
            fd = open_in_root(root_fd, directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            found += [
                f"/{directory}/{name}"
                for name in sorted(os.listdir(fd))
                if name.startswith(prefixes)
            ]
        finally:
            os.close(fd)
    return found


@contextlib.contextmanager
def tls_libraries(pid: int, prefixes: tuple[str, ...]) -> Iterator[list[tuple[str, int]]]:
    """(path in the root, open fd) of each distinct shared library in pid's root whose
    name starts with one of prefixes (the TLS plug-ins': libssl.so); the fds are closed
    on leaving. [] when the process is gone or nothing is looked for."""
    if not prefixes:
        yield []
        return
    try:
        root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield []
        return
    opened: list[tuple[str, int]] = []
    try:
        seen: set[tuple[int, int]] = set()
        candidates = _ld_cache_paths(root_fd, prefixes) + _directory_paths(root_fd, prefixes)
        for path in dict.fromkeys(candidates):
            if len(opened) >= _MAX_LIBRARIES:
                break
            try:
                fd = open_in_root(root_fd, path)
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen or not os.path.isfile(f"/proc/self/fd/{fd}"):
                os.close(fd)
                continue
            seen.add((st.st_dev, st.st_ino))
            opened.append((path, fd))
        yield opened
    finally:
        os.close(root_fd)
        for _path, fd in opened:
            os.close(fd)
