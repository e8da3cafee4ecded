"""open_private: records and stats files are owner-only; devices and pipes keep theirs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from flowtap.sinks.base import open_private


def test_new_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    old = os.umask(0)
    try:
        with open_private(str(path)) as stream:
            stream.write("x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_wide_file_is_narrowed_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text("first\n")
    path.chmod(0o644)
    with open_private(str(path)) as stream:
        stream.write("second\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "first\nsecond\n"


def test_a_fifo_keeps_its_mode(tmp_path: Path) -> None:
    """--output-file /dev/null or a named pipe: not the sensor's to chmod."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo, 0o644)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with open_private(str(fifo)) as stream:
            stream.write("record\n")
        assert os.read(reader, 100) == b"record\n"
    finally:
        os.close(reader)
    assert stat.S_IMODE(fifo.stat().st_mode) == 0o644
