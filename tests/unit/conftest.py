"""Shared unit-test fixtures: real record layouts from the compiled object, a fake /proc.

The layouts come from the BTF of src/flowtap/bpf/conn.bpf.o exactly as the sensor reads
them; opening the object parses the ELF only (no root, nothing is loaded into the kernel).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowtap.events import EventDecoder
from flowtap.loader.btf import Btf
from flowtap.loader.libbpf import BpfObject
from flowtap.loader.system import bpf_object_path
from flowtap.records.connection import WallClock

Fields = dict[str, int | bytes]
# pack_event("ft_conn_open_event", {...}) -> the record's bytes, hdr.kind filled in.
PackEvent = Callable[[str, Fields], bytes]
# add_process(pid, comm=..., ppid=..., uid=..., cmdline=..., exe=..., cgroup=..., stat_comm=...)
AddProcess = Callable[..., Path]

# Wall clock of the fixed_clock fixture: monotonic 0 is 2023-11-14T22:13:20.123456789Z.
FIXED_WALL_NS = 1_700_000_000_123_456_789

_KIND_OF_STRUCT = {
    "ft_conn_open_event": "FT_EVENT_CONN_OPEN",
    "ft_conn_close_event": "FT_EVENT_CONN_CLOSE",
    "ft_exec_event": "FT_EVENT_EXEC",
    "ft_exit_event": "FT_EVENT_EXIT",
    "ft_data_event": "FT_EVENT_DATA",
    "ft_fork_event": "FT_EVENT_FORK",
}


@pytest.fixture(scope="session")
def btf() -> Iterator[Btf]:
    path = bpf_object_path("conn.bpf.o")
    if not path.exists():
        pytest.fail(f"{path} is missing: build it with `make bpf`", pytrace=False)
    obj = BpfObject.open(path)
    try:
        yield Btf(obj)
    finally:
        obj.close()


@pytest.fixture(scope="session")
def decoder(btf: Btf) -> EventDecoder:
    return EventDecoder(btf)


@pytest.fixture(scope="session")
def kinds(btf: Btf) -> dict[str, int]:
    """enum ft_event_kind, by name."""
    return btf.enum_values("ft_event_kind")


@pytest.fixture(scope="session")
def directions(btf: Btf) -> dict[str, int]:
    """enum ft_direction, by name."""
    return btf.enum_values("ft_direction")


@pytest.fixture(scope="session")
def flows(btf: Btf) -> dict[str, int]:
    """enum ft_flow, by name."""
    return btf.enum_values("ft_flow")


@pytest.fixture(scope="session")
def pack_event(decoder: EventDecoder, kinds: dict[str, int]) -> PackEvent:
    """Builds a ring-buffer record with the real layout; unnamed fields are zero."""

    def pack(struct_name: str, fields: Fields) -> bytes:
        values: Fields = {"hdr.kind": kinds[_KIND_OF_STRUCT[struct_name]]}
        values.update(fields)
        return decoder.layout(struct_name).pack(values)

    return pack


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> WallClock:
    """A WallClock whose monotonic 0 is FIXED_WALL_NS, so timestamps are exact."""
    with monkeypatch.context() as patch:
        patch.setattr(time, "time_ns", lambda: FIXED_WALL_NS)
        patch.setattr(time, "monotonic_ns", lambda: 0)
        return WallClock()


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    # Entries that are not processes, as in the real /proc.
    (root / "sys").mkdir()
    (root / "self").symlink_to("1")
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    return root


@pytest.fixture
def add_process(proc_root: Path) -> AddProcess:
    """Writes /proc/PID/{status,cmdline,stat,cgroup} and the exe symlink under proc_root."""

    def add(
        pid: int,
        *,
        comm: str = "curl",
        ppid: int = 1,
        uid: int = 0,
        cmdline: tuple[str, ...] = (),
        exe: str | None = "/usr/bin/curl",
        cgroup: str = "0::/user.slice/user-0.slice/session-1.scope\n",
        stat_comm: str | None = None,
    ) -> Path:
        base = proc_root / str(pid)
        base.mkdir()
        (base / "status").write_text(
            f"Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\n"
            f"Ngid:\t0\nPid:\t{pid}\nPPid:\t{ppid}\nTracerPid:\t0\n"
            f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\nThreads:\t1\n"
        )
        (base / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in cmdline))
        name = comm if stat_comm is None else stat_comm
        (base / "stat").write_text(
            f"{pid} ({name}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0\n"
        )
        (base / "cgroup").write_text(cgroup)
        if exe is not None:
            (base / "exe").symlink_to(exe)  # dangling is fine: only readlink() is used
        return base

    return add
