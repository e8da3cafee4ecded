"""Finding the files a process runs code from (/proc/PID/maps), and inspecting them."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from flowtap.discovery.cache import ClassCache
from flowtap.tls import attach
from flowtap.tls.attach import inspect_file
from flowtap.tls.libraries import (
    MappedFile,
    executable_mappings,
    map_files_name,
    parse_maps_line,
)
from flowtap.tls.placement import Placement

LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")

MAPS = """\
55d0c0a00000-55d0c0a2a000 r--p 00000000 fd:01 1311 /usr/bin/curl
55d0c0a2a000-55d0c0a8b000 r-xp 0002a000 fd:01 1311 /usr/bin/curl
7f1c4a000000-7f1c4a021000 rw-p 00000000 00:00 0
7f1c4a200000-7f1c4a25e000 r-xp 0001f000 fd:01 2660 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c4a300000-7f1c4a3a0000 r-xp 00000000 00:2d 91 /tmp/old lib.so (deleted)
7f1c4a3a0000-7f1c4a3b0000 r-xp 00001000 fd:01 2660 /usr/lib/x86_64-linux-gnu/libssl.so.3
7ffd5c3f0000-7ffd5c411000 rw-p 00000000 00:00 0 [stack]
7ffd5c5f0000-7ffd5c5f2000 r-xp 00000000 00:00 0 [vdso]
"""


def test_parse_maps_line() -> None:
    line = "7f1c4a200000-7f1c4a25e000 r-xp 0001f000 fd:01 2660 /usr/lib/libssl.so.3"
    assert parse_maps_line(line) == (
        "7f1c4a200000-7f1c4a25e000",
        "r-xp",
        (0xFD, 0x01, 2660),
        "/usr/lib/libssl.so.3",
    )
    # Anonymous, special and malformed lines are not files.
    for other in (
        "7f1c4a000000-7f1c4a021000 rw-p 00000000 00:00 0",
        "7ffd5c5f0000-7ffd5c5f2000 r-xp 00000000 00:00 0 [vdso]",
        "7f-7f r-xp 0 zz:01 5 /x",
        "7f-7f r-xp 0 fd:01 notanumber /x",
        "garbage",
        "",
    ):
        assert parse_maps_line(other) is None


def test_executable_mappings_once_per_file(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42" / "map_files").mkdir(parents=True)
    (proc / "42" / "maps").write_text(MAPS)
    # map_files reaches the curl mapping; the others go through the process's root.
    (proc / "42" / "map_files" / "55d0c0a2a000-55d0c0a8b000").write_text("")

    found = executable_mappings(42, proc)

    assert [(m.key, m.path) for m in found] == [
        ((0xFD, 1, 1311), "/usr/bin/curl"),
        ((0xFD, 1, 2660), "/usr/lib/x86_64-linux-gnu/libssl.so.3"),
        ((0, 0x2D, 91), "/tmp/old lib.so"),
    ]
    assert found[0].access == proc / "42" / "map_files" / "55d0c0a2a000-55d0c0a8b000"
    assert found[1].access == proc / "42" / "root" / "usr/lib/x86_64-linux-gnu/libssl.so.3"


def test_map_files_names_drop_the_padding() -> None:
    """maps pads addresses to 8 digits; map_files names do not (a non-PIE Go binary)."""
    assert map_files_name("00400000-006ed000") == "400000-6ed000"
    assert map_files_name("55d0c0a2a000-55d0c0a8b000") == "55d0c0a2a000-55d0c0a8b000"


def test_process_gone(tmp_path: Path) -> None:
    assert executable_mappings(7, tmp_path) == []


@pytest.mark.skipif(not LIBSSL.exists(), reason="needs Debian's libssl.so.3")
def test_damaged_libraries_never_raise(tmp_path: Path) -> None:
    """Flipped bytes and cut files: inspect_file returns a plan or None, never raises."""
    original = LIBSSL.read_bytes()
    rng = random.Random(1234)
    target = tmp_path / "libssl.so.3"
    for round_ in range(60):
        data = bytearray(original[: rng.choice((64, 4096, len(original)))])
        for _ in range(rng.randint(1, 40)):
            # Mostly the headers and tables, where a parser is most exposed.
            span = 8192 if round_ % 2 else len(data)
            data[rng.randrange(min(span, len(data)))] = rng.randrange(256)
        target.write_bytes(bytes(data))
        inspect_file(target, "fuzzed")


@pytest.mark.skipif(not LIBSSL.exists(), reason="needs Debian's libssl.so.3")
def test_debian_libssl_is_probed_at_its_internal_functions(tmp_path: Path) -> None:
    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)

    found = inspect_file(copy, "libssl")

    assert found is not None
    placement = found.plan
    assert isinstance(placement, Placement)
    assert placement.kind == "internal"
    assert [p.entry_program for p in placement.probes] == [
        "ssl_read_ex_enter",
        "ssl_write_ex_enter",
    ]


class _FakeLink:
    def __init__(self, log: list[str], what: str) -> None:
        self._log, self._what = log, what

    def destroy(self) -> None:
        self._log.append("destroy " + self._what)


class _FakeProgram:
    def __init__(self, name: str, log: list[str]) -> None:
        self._name, self._log = name, log

    def attach_uprobe(
        self, binary: str, offset: int, *, pid: int = -1, retprobe: bool = False
    ) -> _FakeLink:
        what = f"{self._name} pid={pid}"
        self._log.append("attach " + what)
        return _FakeLink(self._log, what)


class _FakeMap:
    def __init__(self, name: str, log: list[str]) -> None:
        self._name, self._log = name, log

    def update(self, key: bytes, value: bytes) -> None:
        self._log.append(f"update {self._name} {key.hex()}={value.hex()}")


class _FakeObject:
    def __init__(self) -> None:
        self.log: list[str] = []

    def program(self, name: str) -> _FakeProgram:
        return _FakeProgram(name, self.log)

    def map(self, name: str) -> _FakeMap:
        return _FakeMap(name, self.log)


@pytest.mark.skipif(not LIBSSL.exists(), reason="needs Debian's libssl.so.3")
def test_process_mode_budget_defers_and_links_are_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    mapped = MappedFile((1, 2, 3), str(copy), copy)
    monkeypatch.setattr(attach, "executable_mappings", lambda _pid: [mapped])
    monkeypatch.setattr(time, "monotonic", lambda: 1000.5)  # all within one second
    fake = _FakeObject()
    probes = attach.TlsProbes(fake, "process")  # type: ignore[arg-type]

    for pid in range(100, 130):
        probes.on_connection(pid)

    attached = {line.split("pid=")[1] for line in fake.log if line.startswith("attach")}
    # 20 new processes a second; the others are counted and tried again later.
    assert len(attached) == 20
    assert probes.stats.attach_deferred == 30 - len(attached)
    assert probes.stats.files_examined == 1  # the file is read once
    probes.forget_process(100)
    probes.detach(timeout_s=5)
    destroyed = [line for line in fake.log if line.startswith("destroy")]
    assert len(destroyed) == 4 * len(attached)  # 2 probes x (entry + return) each
    # The probes were told to stop, all at once, before the first link went.
    stopped = fake.log.index("update tls_stopped 00000000=01000000")
    assert stopped < fake.log.index(destroyed[-1])


@pytest.mark.skipif(not LIBSSL.exists(), reason="needs Debian's libssl.so.3")
def test_files_are_read_once_per_identity(tmp_path: Path) -> None:
    """The exec classes say which files need nothing (not read again, even by a new
    TlsProbes after a restart); a file rewritten in place is read again and its old
    probes go."""
    library = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, library)
    plain = tmp_path / "plain"
    shutil.copy("/bin/true", plain)
    cache = ClassCache(tmp_path / "state")
    fake = _FakeObject()
    probes = attach.TlsProbes(fake, "file", cache=cache)  # type: ignore[arg-type]

    assert probes.probe_file(str(plain), "plain") is None
    assert probes.probe_file(str(library), "libssl") is not None
    assert probes.probed_for_all(str(library))
    assert probes.stats.files_examined == 2
    probes.probe_file(str(plain), "plain")
    probes.probe_file(str(library), "libssl")
    assert probes.stats.files_examined == 2  # known: not read again
    cache.save()

    restarted = ClassCache(tmp_path / "state")
    assert restarted.load() == 2
    after = attach.TlsProbes(_FakeObject(), "file", cache=restarted)  # type: ignore[arg-type]
    assert after.probe_file(str(plain), "plain") is None
    assert (after.stats.files_examined, after.stats.cache_hits) == (0, 1)

    attaches = sum(line.startswith("attach") for line in fake.log)
    with library.open("r+b") as stream:  # rewritten in place: same inode
        stream.seek(0, 2)
        stream.write(b"\0")
    probes.probe_file(str(library), "libssl")
    assert probes.stats.files_examined == 3
    probes.detach(timeout_s=5)
    assert sum(line.startswith("attach") for line in fake.log) == 2 * attaches
    assert sum(line.startswith("destroy") for line in fake.log) == 2 * attaches
