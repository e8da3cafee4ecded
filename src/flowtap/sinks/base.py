"""Where records go: a sink takes JSON-ready records one at a time."""

from __future__ import annotations

import os
import stat
from typing import IO, Protocol

from flowtap.records.connection import Record


class Sink(Protocol):
    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class LineSink:
    """Writes one line per record to a stream, flushed at once so pipelines see it."""

    def __init__(self, stream: IO[str], *, owned: bool) -> None:
        self._stream = stream
        self._owned = owned

    def format(self, record: Record) -> str:
        raise NotImplementedError

    def write(self, record: Record) -> None:
        self._stream.write(self.format(record) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()
        else:
            self._stream.flush()


def open_private(path: str, *, append: bool = True) -> IO[str]:
    """Opens path for writing, created owner-only (0600) from the first byte on."""
    mode = os.O_APPEND if append else os.O_TRUNC
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode | os.O_CLOEXEC, 0o600)
    # An existing file keeps no wider mode than ours; a device or pipe (/dev/null, a FIFO
    # read by another program) is someone else's and keeps its own.
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a" if append else "w", encoding="utf-8", buffering=1)
