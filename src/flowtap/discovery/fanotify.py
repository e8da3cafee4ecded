"""The little of fanotify(7) the exec gate needs, over libc with ctypes.

Permission events (FAN_OPEN_EXEC_PERM) make the kernel hold an exec until this process
answers; when the descriptor closes (the sensor exits, or is killed), the kernel allows
every event still held, so nothing can stay blocked behind a dead sensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_CONTENT = 0x4
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_MOUNT = 0x10
FAN_MARK_IGNORED_MASK = 0x20
FAN_MARK_FILESYSTEM = 0x100
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_ALLOW = 0x1
FAN_NOFD = -1
_AT_FDCWD = -100
_METADATA = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response
_METADATA_VERSION = 3


class FanotifyError(OSError):
    """fanotify is not available, or a call failed (errno and reason in the message)."""


@dataclass(frozen=True, slots=True)
class PermissionEvent:
    fd: int  # the file being executed, opened for us by the kernel; answer, then close
    pid: int  # the process that execs it
    mask: int


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    libc.fanotify_init.restype = ctypes.c_int
    libc.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    libc.fanotify_mark.restype = ctypes.c_int
    return libc


class Fanotify:
    """One fanotify group of class content (permission events), non-blocking."""

    def __init__(self) -> None:
        self._libc = _libc()
        flags = (
            FAN_CLASS_CONTENT
            | FAN_CLOEXEC
            | FAN_NONBLOCK
            | FAN_UNLIMITED_QUEUE
            | FAN_UNLIMITED_MARKS
        )
        fd = self._libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
        if fd < 0:
            err = ctypes.get_errno()
            raise FanotifyError(err, f"fanotify_init: {os.strerror(err)}")
        self.fd: int = fd

    def _mark(self, flags: int, mask: int, dirfd: int, path: str | None) -> None:
        encoded = None if path is None else os.fsencode(path)
        if self._libc.fanotify_mark(self.fd, flags, mask, dirfd, encoded) != 0:
            err = ctypes.get_errno()
            raise FanotifyError(err, f"fanotify_mark {path or dirfd}: {os.strerror(err)}")

    def watch_filesystem(self, path: str) -> None:
        """Exec permission events for every file of the filesystem holding path."""
        self._mark(FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_OPEN_EXEC_PERM, _AT_FDCWD, path)

    def watch_mount(self, path: str) -> None:
        """Exec permission events for the files of the mount holding path."""
        self._mark(FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_OPEN_EXEC_PERM, _AT_FDCWD, path)

    def ignore(self, fd: int) -> None:
        """No more exec events for the file open as fd, until it is written to: without
        FAN_MARK_IGNORED_SURV_MODIFY the kernel drops the ignore mask at the file's first
        modification, so a binary rewritten in place is held and classified again."""
        self._mark(FAN_MARK_ADD | FAN_MARK_IGNORED_MASK, FAN_OPEN_EXEC_PERM, fd, None)

    def read(self) -> list[PermissionEvent]:
        """The events waiting now ([] when none: the descriptor is non-blocking)."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return []
        events: list[PermissionEvent] = []
        offset = 0
        while offset + _METADATA.size <= len(data):
            length, version, _reserved, _meta_len, mask, fd, pid = _METADATA.unpack_from(
                data, offset
            )
            if version != _METADATA_VERSION or length < _METADATA.size:
                raise FanotifyError(0, f"fanotify event version {version}, length {length}")
            events.append(PermissionEvent(fd, pid, mask))
            offset += length
        return events

    def allow(self, fd: int) -> None:
        """Lets the held exec go on (never denied)."""
        os.write(self.fd, _RESPONSE.pack(fd, FAN_ALLOW))

    def close(self) -> None:
        """Closing releases (allows) every event still held."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
