"""Sinks the child-process tests build in the child (sinks/child.py imports them by name:
tests/ is on the child's PYTHONPATH in those tests)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class LinesSink:
    """One JSON line per record; a record with "fail" is refused; with "slow", waits until
    the file `gate` exists (a sink that has fallen behind)."""

    def __init__(self, path: str, gate: str | None = None) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._gate = gate

    def write(self, record: dict[str, Any]) -> None:
        if record.get("fail"):
            raise OSError(28, "No space left on device")
        if self._gate is not None and not Path(self._gate).exists():
            Path(self._gate + ".waiting").touch()  # the test knows a record is taken
            while not Path(self._gate).exists():
                time.sleep(0.01)
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def refuses(setting: str) -> LinesSink:
    raise ValueError(f"the setting {setting} is wrong; give another")
