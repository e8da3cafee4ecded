"""--output-file rotation by size (sinks/rotating.py, safefile.rotate): every record whole
in exactly one file, the right number of files, each owner-only, nothing lost."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from flowtap import safefile
from flowtap.sinks.base import open_private
from flowtap.sinks.jsonl import JsonLinesSink
from flowtap.sinks.rotating import Rotation


def sink(path: Path, max_bytes: int, keep: int) -> tuple[JsonLinesSink, Rotation]:
    stream = open_private(str(path))
    rotation = Rotation(path, stream, max_bytes=max_bytes, keep=keep)
    return JsonLinesSink(stream, owned=True, rotation=rotation), rotation


def record(n: int) -> dict[str, object]:
    return {"type": "connection", "n": n, "pad": "x" * 20}  # 43 or 44 bytes a line


def files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + "*"))


def test_rotation_keeps_every_line_whole_and_counts_files(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    line = len(json.dumps(record(0), separators=(",", ":"))) + 1
    out, rotation = sink(path, max_bytes=3 * line, keep=10)
    for n in range(10):  # 3 lines a file: 4 files, the last with one line
        out.write(record(n))
    out.close()
    assert [p.name for p in files(path)] == [
        "out.jsonl",
        "out.jsonl.1",
        "out.jsonl.2",
        "out.jsonl.3",
    ]
    assert rotation.rotations == 3
    # Oldest first: .3 .2 .1 then the current file.
    order = [path.with_name(f"out.jsonl.{i}") for i in (3, 2, 1)] + [path]
    numbers = [json.loads(text)["n"] for p in order for text in p.read_text().splitlines()]
    assert numbers == list(range(10))
    for p in order:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert p.stat().st_size <= 3 * line
        assert p.read_bytes().endswith(b"\n")


def test_only_keep_old_files_remain(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    out, _rotation = sink(path, max_bytes=1, keep=2)  # every record its own file
    for n in range(6):
        out.write(record(n))
    out.close()
    assert [p.name for p in files(path)] == ["out.jsonl", "out.jsonl.1", "out.jsonl.2"]
    assert [json.loads(path.with_name(f"out.jsonl.{i}").read_text())["n"] for i in (2, 1)] == [3, 4]
    assert json.loads(path.read_text())["n"] == 5


def test_keep_zero_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    out, _rotation = sink(path, max_bytes=1, keep=0)
    for n in range(3):
        out.write(record(n))
    out.close()
    assert files(path) == [path]
    assert json.loads(path.read_text())["n"] == 2


def test_a_record_larger_than_the_limit_has_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    out, _rotation = sink(path, max_bytes=100, keep=5)
    out.write(record(0))
    out.write({"n": 1, "big": "y" * 500})
    out.write(record(2))
    out.close()
    assert json.loads(path.with_name("out.jsonl.2").read_text())["n"] == 0
    assert json.loads(path.with_name("out.jsonl.1").read_text())["n"] == 1
    assert json.loads(path.read_text())["n"] == 2


def test_an_existing_file_counts_toward_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n" * 10)  # 40 bytes
    out, _rotation = sink(path, max_bytes=60, keep=1)
    out.write(record(0))  # 40 + 44 > 60: the old content is rotated away first
    out.close()
    assert path.with_name("out.jsonl.1").read_text() == "old\n" * 10
    assert json.loads(path.read_text())["n"] == 0


def test_rotation_refuses_another_users_old_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another user")
    path = tmp_path / "out.jsonl"
    planted = path.with_name("out.jsonl.1")
    planted.write_text("theirs\n")
    os.chown(planted, 65534, 65534)
    fd = safefile.open_append(path)
    os.write(fd, b"ours\n")
    with pytest.raises(safefile.UnsafeFileError, match="another user"):
        safefile.rotate(path, 1, fd)
    os.close(fd)
    assert planted.read_text() == "theirs\n" and path.read_text() == "ours\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left
