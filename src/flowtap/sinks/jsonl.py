"""JSON lines: one record per line, flushed per line so pipelines see it at once."""

from __future__ import annotations

import json
from typing import IO

from flowtap.records.connection import Record


class JsonLinesSink:
    def __init__(self, stream: IO[str], *, owned: bool) -> None:
        self._stream = stream
        self._owned = owned

    def write(self, record: Record) -> None:
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()
        else:
            self._stream.flush()
