"""Where records go: a sink takes JSON-ready records one at a time."""

from __future__ import annotations

import io
import os
import stat
from typing import IO, Protocol

from flowtap import safefile
from flowtap.records.connection import Record
from flowtap.sinks.rotating import Rotation


class Sink(Protocol):
    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class LineSink:
    """Writes one line per record to a stream, at once so pipelines see it.

    A line goes to the stream's descriptor in whole-line system calls, never through a
    buffer: a failed write (a full disk) leaves nothing pending to be written later, or
    at close, so each record is either in the file whole or counted as lost, once."""

    def __init__(self, stream: IO[str], *, owned: bool, rotation: Rotation | None = None) -> None:
        """rotation: the --output-file's rotation by size (it then owns the stream)."""
        self._stream = stream
        self._owned = owned
        self._rotation = rotation
        self._fd: int | None
        try:
            stream.flush()
            self._fd = stream.fileno()
        except (io.UnsupportedOperation, AttributeError, ValueError):
            self._fd = None  # an in-memory stream (tests)
        self._regular = self._fd is not None and stat.S_ISREG(os.fstat(self._fd).st_mode)

    def format(self, record: Record) -> str:
        raise NotImplementedError

    def write(self, record: Record) -> None:
        line = self.format(record) + "\n"
        if self._fd is None:
            self._stream.write(line)
            self._stream.flush()
            return
        data = line.encode("utf-8", "surrogateescape")
        if self._rotation is not None:
            self._fd = self._rotation.fd_for(len(data))
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            if written and self._regular:
                # Half a line would run into the next record: take it back.
                end = os.lseek(self._fd, 0, os.SEEK_END)
                os.ftruncate(self._fd, end - written)
            raise
        if self._rotation is not None:
            self._rotation.wrote(written)

    def close(self) -> None:
        if self._rotation is not None:
            self._rotation.close()
        elif self._owned:
            self._stream.close()
        else:
            self._stream.flush()


def open_private(path: str, *, append: bool = True) -> IO[str]:
    """Opens path for writing, created owner-only (0600) from the first byte on, and safe
    in a directory others can write (safefile: no links followed, no file of another
    user's written). An existing file of ours is narrowed to 0600; a device or a pipe
    (/dev/null, a FIFO read by another program) keeps its mode."""
    fd = safefile.open_append(path, truncate=not append)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)
