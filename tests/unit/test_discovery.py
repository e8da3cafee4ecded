"""Program start, without the kernel: file identities, the persistent exec classes, the
gate's helpers, private roots, the worker's order, and hostile ELF files."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from flowtap.discovery import roots
from flowtap.discovery.cache import CACHE_NAME, ClassCache, Entry, Identity
from flowtap.discovery.fanotify import FAN_OPEN_EXEC_PERM, PermissionEvent
from flowtap.discovery.gate import ExecGate, filesystems, own_descendant
from flowtap.discovery.worker import DiscoveryWorker
from flowtap.tls.attach import inspect_file
from flowtap.tls.elf import ElfImage, find_windowed

LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
needs_libssl = pytest.mark.skipif(not LIBSSL.exists(), reason="needs Debian's libssl.so.3")


# --- identity ---------------------------------------------------------------------------


def test_identity_changes_with_a_copy_and_a_rewrite(tmp_path: Path) -> None:
    first = tmp_path / "program"
    first.write_bytes(b"\x7fELF one")
    identity = Identity.of(os.stat(first))
    assert Identity.of(os.stat(first)) == identity  # stable while nothing changes
    fd = os.open(first, os.O_RDONLY)
    try:
        assert Identity.of_fd(fd) == identity
    finally:
        os.close(fd)

    copy = tmp_path / "copy"
    shutil.copy2(first, copy)  # same bytes and mtime, a new inode
    assert Identity.of(os.stat(copy)) != identity

    os.utime(first, ns=(1, 2))  # same inode and size, another mtime
    assert Identity.of(os.stat(first)) != identity
    first.write_bytes(b"\x7fELF two, longer")  # rewritten in place: same inode
    rewritten = Identity.of(os.stat(first))
    assert rewritten.inode == identity.inode and rewritten != identity


# --- the persistent cache ----------------------------------------------------------------


def _identity(n: int) -> Identity:
    return Identity(2049, 1000 + n, 4096 * n, 1_700_000_000_000_000_000 + n)


def test_cache_round_trip_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cache = ClassCache(state)
    cache.record(_identity(1), Entry("nothing", "/usr/bin/true"))
    cache.record(_identity(2), Entry("probe", "/usr/bin/node", "exported"))
    assert cache.dirty
    cache.save()
    assert not cache.dirty
    path = state / CACHE_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in state.iterdir()] == [CACHE_NAME]  # no temporary left

    again = ClassCache(state)
    assert again.load() == 2
    assert again.lookup(_identity(1)) == Entry("nothing", "/usr/bin/true")
    assert again.lookup(_identity(2)) == Entry("probe", "/usr/bin/node", "exported")
    assert again.lookup(_identity(3)) is None
    assert not again.dirty


def test_cache_records_once(tmp_path: Path) -> None:
    cache = ClassCache(tmp_path)
    cache.record(_identity(1), Entry("nothing", "/bin/true"))
    cache.save()
    cache.record(_identity(1), Entry("nothing", "/bin/true"))
    assert not cache.dirty  # the same verdict again changes nothing to write


def test_cache_without_directory_is_memory_only() -> None:
    cache = ClassCache(None)
    cache.record(_identity(1), Entry("nothing", "/bin/true"))
    cache.save()
    assert cache.load() == 0 and len(cache) == 1


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"format": 1}',
        b'{"format": 1, "files": [[1, 2, 3]]}',
        b'{"format": 1, "files": [["x", 2, 3, 4, "nothing", "/p", ""]]}',
        b"[]",
    ],
)
def test_cache_malformed_is_ignored(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / CACHE_NAME
    path.write_bytes(content)
    path.chmod(0o600)
    cache = ClassCache(tmp_path)
    assert cache.load() == 0 and len(cache) == 0


def test_cache_other_format_and_unknown_verdicts(tmp_path: Path) -> None:
    path = tmp_path / CACHE_NAME
    rows = [[1, 2, 3, 4, "deny", "/p", ""], [1, 3, 3, 4, "nothing", "/q", ""]]
    path.write_text(json.dumps({"format": 1, "files": rows}))
    path.chmod(0o600)
    assert ClassCache(tmp_path).load() == 1  # an unknown verdict is skipped
    path.write_text(json.dumps({"format": 99, "files": rows}))
    assert ClassCache(tmp_path).load() == 0


def test_cache_untrusted_files_are_ignored(tmp_path: Path) -> None:
    good = ClassCache(tmp_path / "good")
    good.record(_identity(1), Entry("nothing", "/bin/true"))
    good.save()
    written = tmp_path / "good" / CACHE_NAME

    writable = tmp_path / "writable"
    writable.mkdir()
    shutil.copy(written, writable / CACHE_NAME)
    (writable / CACHE_NAME).chmod(0o666)
    assert ClassCache(writable).load() == 0

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / CACHE_NAME).symlink_to(written)
    assert ClassCache(linked).load() == 0  # O_NOFOLLOW

    # save() never writes through a symlink planted at the final name: the rename
    # replaces the link itself.
    linked_cache = ClassCache(linked)
    linked_cache.record(_identity(2), Entry("nothing", "/bin/false"))
    linked_cache.save()
    assert not (linked / CACHE_NAME).is_symlink()
    assert ClassCache(tmp_path / "good").load() == 1


# --- the gate's helpers ------------------------------------------------------------------


def test_own_descendant() -> None:
    me = os.getpid()
    assert own_descendant(me, me)
    assert own_descendant(me, os.getppid())  # this process descends from its parent
    assert not own_descendant(os.getppid(), me)
    assert not own_descendant(1, me)
    assert not own_descendant(2**22 + 7, me)  # no such process


def test_filesystems_given_or_all() -> None:
    assert filesystems((Path("/tmp"),)) == ["/tmp"]
    found = filesystems(())
    assert "/" in found
    assert "/proc" not in found and "/sys" not in found
    devices = [os.stat(point).st_dev for point in found]
    assert len(devices) == len(set(devices))  # one mount point per filesystem


# --- private roots -----------------------------------------------------------------------


def test_open_in_root_stays_in_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/libssl.so.3").write_bytes(b"inside")
    # An absolute symlink in the root resolves in the root, never on the host.
    (root / "usr/lib/libssl.so").symlink_to("/usr/lib/libssl.so.3")
    (root / "escape").symlink_to("../../../../../../../../etc/hostname")
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = roots.open_in_root(root_fd, "/usr/lib/libssl.so")
        with os.fdopen(fd, "rb") as stream:
            assert stream.read() == b"inside"
        with pytest.raises(OSError):
            roots.open_in_root(root_fd, "escape")  # clamped to the root: no such file
    finally:
        os.close(root_fd)


def test_root_libraries_from_ld_cache_and_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "opt/ssl/lib").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "opt/ssl/lib/libssl.so.3").write_bytes(b"from the cache")
    (root / "usr/lib/x86_64-linux-gnu/libssl.so.1.1").write_bytes(b"from the directory")
    (root / "usr/lib/x86_64-linux-gnu/libcrypto.so.3").write_bytes(b"not ssl")
    cache = b"glibc-ld.so.cache1.1\0libssl.so.3\0/opt/ssl/lib/libssl.so.3\0/lib/libz.so.1\0"
    (root / "etc/ld.so.cache").write_bytes(cache)
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "root").symlink_to(root)
    real_open = os.open

    def fake_open(path: str | Path, flags: int, *args: int) -> int:
        text = str(path)
        if text.startswith("/proc/77/"):
            text = str(proc) + text[len("/proc") :]
        return real_open(text, flags, *args)

    monkeypatch.setattr(os, "open", fake_open)
    with roots.tls_libraries(77, ("libssl.so",)) as found:
        contents = sorted(os.pread(fd, 64, 0) for _path, fd in found)
        paths = sorted(path for path, _fd in found)
    assert contents == [b"from the cache", b"from the directory"]
    assert paths == ["/opt/ssl/lib/libssl.so.3", "/usr/lib/x86_64-linux-gnu/libssl.so.1.1"]
    with roots.tls_libraries(2**22 + 9, ("libssl.so",)) as none:
        assert none == []


def test_root_key_of_this_process() -> None:
    key = roots.root_key(os.getpid())
    assert key is not None
    assert key[1:] == (os.stat("/").st_dev, os.stat("/").st_ino)
    assert roots.root_key(2**22 + 11) is None


# --- the worker --------------------------------------------------------------------------


def test_worker_runs_urgent_jobs_first_and_survives_failures() -> None:
    worker = DiscoveryWorker()
    gate = threading.Event()
    done: list[str] = []
    worker.submit(lambda: gate.wait(5))  # holds the worker while the others queue
    worker.start()
    for name in ("a", "b"):
        worker.submit(lambda name=name: done.append(name))  # type: ignore[misc]
    worker.submit(lambda: 1 // 0)
    worker.submit(lambda: done.append("urgent"), urgent=True)
    gate.set()
    deadline = time.monotonic() + 5
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.stop()
    assert done == ["urgent", "a", "b"]
    assert worker.failed == 1


# --- hostile ELF files --------------------------------------------------------------------


def test_find_windowed_across_windows() -> None:
    data = bytes(9 << 20) + b"SSL_write\0" + bytes(10)
    assert find_windowed(data, b"SSL_write\0") == 9 << 20
    straddling = bytes((4 << 20) - 3) + b"SSL_write\0"
    assert find_windowed(straddling, b"SSL_write\0") == (4 << 20) - 3
    assert find_windowed(data, b"nothing here") == -1


def _elf_header(shoff: int, shnum: int, shentsize: int = 64, phnum: int = 0) -> bytes:
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    return ident + struct.pack(
        "<HHIQQQIHHHHHH", 3, 62, 1, 0, 64 if phnum else 0, shoff, 0, 64, 56, phnum,
        shentsize, shnum, 0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "content",
    [
        _elf_header(shoff=1 << 40, shnum=3) + b"SSL_write\0SSL_read\0",  # headers past the end
        _elf_header(shoff=64, shnum=60000) + b"SSL_write\0",  # more headers than any file
        _elf_header(shoff=64, shnum=2, shentsize=12) + b"SSL_write\0",
        _elf_header(shoff=0, shnum=0, phnum=50000) + b"SSL_write\0",
        b"\x7fELF\x02\x01" + b"SSL_write\0",  # cut inside the header
        b"#!/bin/sh\nSSL_write\0\n",  # not ELF at all
        b"\x7fELF\x01\x01\x01" + bytes(64) + b"SSL_write\0",  # 32-bit
    ],
)
def test_hostile_headers_mean_nothing_to_probe(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "hostile"
    target.write_bytes(content)
    started = time.monotonic()
    assert inspect_file(target, "hostile") is None
    assert time.monotonic() - started < 1.0


@needs_libssl
def test_huge_symbol_table_sizes_are_refused(tmp_path: Path) -> None:
    """A section header claiming gigabytes is refused before anything is read."""
    data = bytearray(LIBSSL.read_bytes())
    with ElfImage(LIBSSL) as image:
        dynsym = image._sections[".dynsym"]
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shnum = struct.unpack_from("<H", data, 0x3C)[0]
    for index in range(shnum):
        at = shoff + index * 64
        if struct.unpack_from("<Q", data, at + 24)[0] == dynsym.offset:
            struct.pack_into("<Q", data, at + 32, 1 << 34)  # sh_size: 16 GB
    target = tmp_path / "libssl.so.3"
    target.write_bytes(bytes(data))
    started = time.monotonic()
    assert inspect_file(target, "huge") is None
    assert time.monotonic() - started < 1.0


@needs_libssl
def test_truncated_library_means_nothing_to_probe(tmp_path: Path) -> None:
    target = tmp_path / "libssl.so.3"
    original = LIBSSL.read_bytes()
    for length in (64, 4096, len(original) // 2, len(original) - 1):
        target.write_bytes(original[:length])
        assert inspect_file(target, "cut") is None or length == len(original) - 1


@needs_libssl
def test_symbol_search_matches_pyelftools() -> None:
    """The byte search finds what a full walk of the table finds."""
    names = {"SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex", "SSL_new"}
    with ElfImage(LIBSSL) as image:
        fast = {name: (f.address, f.size) for name, f in image.functions(names).items()}
    with LIBSSL.open("rb") as stream:
        table = ELFFile(stream).get_section_by_name(".dynsym")
        assert isinstance(table, SymbolTableSection)
        slow = {
            s.name: (s["st_value"], s["st_size"])
            for s in table.iter_symbols()
            if s.name in names and s["st_shndx"] != "SHN_UNDEF"
        }
    assert fast == slow and len(fast) == len(names)


# --- the answering thread, with a fake fanotify ------------------------------------------


class _FakeFanotify:
    """Events come from a list; the descriptor polled is a pipe's read end."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        self.events: list[PermissionEvent] = []
        self.allowed: list[tuple[float, str]] = []
        self.ignored: list[str] = []

    def push(self, event: PermissionEvent) -> None:
        self.events.append(event)
        os.write(self._w, b"x")

    def read(self) -> list[PermissionEvent]:
        os.read(self.fd, 4096)
        events, self.events = self.events, []
        return events

    def allow(self, fd: int) -> None:
        self.allowed.append((time.monotonic(), os.readlink(f"/proc/self/fd/{fd}")))

    def ignore(self, fd: int) -> None:
        self.ignored.append(os.readlink(f"/proc/self/fd/{fd}"))

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._w)


class _FakeTls:
    mode = "file"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.seen: list[str] = []

    def probe_file(self, access: str, shown_as: str, *, attach: bool = True) -> None:
        time.sleep(self.delay_s)
        self.seen.append(shown_as)

    def probed_for_all(self, access: str) -> bool:
        return False


def _gate(
    tls: _FakeTls, hold_s: float, in_scope: Callable[[int], bool] = lambda _pid: True
) -> tuple[ExecGate, _FakeFanotify, DiscoveryWorker]:
    worker = DiscoveryWorker()
    worker.start()
    gate = ExecGate(
        tls,  # type: ignore[arg-type]
        worker,
        ClassCache(None),
        hold_s=hold_s,
        in_scope=in_scope,
    )
    fan = _FakeFanotify()
    gate._fanotify = fan  # type: ignore[assignment]
    thread = threading.Thread(target=gate._answer, daemon=True)
    gate._thread = thread
    thread.start()
    return gate, fan, worker


def _exec_of(path: str, pid: int) -> PermissionEvent:
    return PermissionEvent(os.open(path, os.O_RDONLY), pid, FAN_OPEN_EXEC_PERM)


def _wait(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_gate_holds_until_classified(tmp_path: Path) -> None:
    program = tmp_path / "program"
    shutil.copy("/bin/true", program)
    tls = _FakeTls(delay_s=0.1)
    gate, fan, worker = _gate(tls, hold_s=5.0)
    try:
        pushed = time.monotonic()
        fan.push(_exec_of(str(program), 2**22 + 1))
        _wait(lambda: bool(fan.allowed))
        (when, path), *_ = fan.allowed
        assert path == str(program) and tls.seen == [str(program)]
        assert 0.1 <= when - pushed < 2.0  # after the classification, not before
        assert fan.ignored == [str(program)]  # nothing more to do: never held again
        assert gate.stats.held == 1 and gate.stats.expired == 0
    finally:
        gate.stop()
        worker.stop()


def test_gate_allows_at_the_deadline(tmp_path: Path) -> None:
    program = tmp_path / "program"
    shutil.copy("/bin/true", program)
    gate, fan, worker = _gate(_FakeTls(delay_s=1.0), hold_s=0.1)
    try:
        pushed = time.monotonic()
        fan.push(_exec_of(str(program), 2**22 + 1))
        _wait(lambda: bool(fan.allowed))
        assert fan.allowed and fan.allowed[0][0] - pushed < 0.5
        _wait(lambda: gate.stats.finished_late == 1)  # the worker's late end, counted
        assert gate.stats.expired == 1 and gate.stats.finished_late == 1
    finally:
        gate.stop()
        worker.stop()


def test_gate_answers_when_a_check_fails(tmp_path: Path) -> None:
    def broken(_pid: int) -> bool:
        raise RuntimeError("map lookup failed")

    gate, fan, worker = _gate(_FakeTls(), hold_s=5.0, in_scope=broken)
    try:
        fan.push(_exec_of("/bin/true", 2**22 + 1))
        fan.push(_exec_of("/bin/true", os.getpid()))  # the sensor's own: at once
        _wait(lambda: len(fan.allowed) == 2)
        assert len(fan.allowed) == 2 and gate.stats.passed_own == 1
        assert gate._thread is not None and gate._thread.is_alive()
    finally:
        gate.stop()
        worker.stop()
