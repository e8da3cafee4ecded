"""Rotation by size for the `--output-file` sink: before a record would take the file past
--output-max-bytes, the file becomes FILE.1 (FILE.1 becomes FILE.2 ..., at most
--output-keep old files) and the record starts a new FILE.

A record is one write into one file, decided before it is written: no line is ever split
across files, and a record larger than the limit has a file of its own. The renames are
safefile.rotate's: every file owner-only, FILE always names a whole file."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import IO

from flowtap import safefile


class Rotation:
    """The output file's current descriptor and size; rotate() when a record will not fit."""

    def __init__(self, path: Path, stream: IO[str], *, max_bytes: int, keep: int) -> None:
        if max_bytes <= 0 or keep < 0:
            raise ValueError("--output-max-bytes is above 0 and --output-keep is 0 or more")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._stream: IO[str] | None = stream  # the file the run opened (closed at rotation)
        self.fd = stream.fileno()
        st = os.fstat(self.fd)
        # A device or a pipe (/dev/stdout) has no size to limit: written, never rotated.
        self.regular = stat.S_ISREG(st.st_mode)
        self.size = st.st_size
        self.rotations = 0

    def fd_for(self, length: int) -> int:
        """The descriptor to write a record of length bytes to (after a rotation if the
        current file has something and the record would take it past the limit)."""
        if self.regular and self.size > 0 and self.size + length > self.max_bytes:
            new = safefile.rotate(self.path, self.keep, self.fd)
            self._close_current()
            self.fd, self.size = new, 0
            self.rotations += 1
        return self.fd

    def wrote(self, length: int) -> None:
        self.size += length

    def _close_current(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        else:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def close(self) -> None:
        self._close_current()
