"""Process registry: pid -> exe, cmdline, user and container, however short the process lived.

Filled from a /proc scan at start, from exec events (which carry exe and argv, so a
process that exits before we look is still named), and lazily from /proc for anything
else. Exited processes are kept for a grace period so late connection records resolve.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from flowtap.egress.strategy import StrategyName
from flowtap.events import Exec, Exit, Task
from flowtap.loader.system import cgroup2_mount
from flowtap.tracking.environment import EnvironmentReader, Tags

# 64 hex digits in a cgroup path: docker-<id>.scope, cri-containerd-<id>.scope,
# crio-<id>.scope, libpod-<id>.scope, /docker/<id>, /kubepods/.../<id>.
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)")
_EXITED_GRACE_S = 30.0
_MAX_PROCESSES = 65536


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    exe: str | None
    comm: str
    cmdline: tuple[str, ...]
    uid: int
    user: str | None
    container_id: str | None
    ppid: int | None = None
    # From its environment, read once (tracking/environment.py): QPOINT_TAGS and the
    # configuration's env tags, and QPOINT_STRATEGY as it applies to this executable.
    tags: Tags = ()
    strategy: StrategyName = "observe"


def _resolved(filename: str) -> str | None:
    """The path execve() was given, with symlinks resolved as /proc/PID/exe would show it
    (a venv's bin/python is /usr/bin/python3.11); relative paths are kept as given."""
    if not filename:
        return None
    return os.path.realpath(filename) if filename.startswith("/") else filename


def container_id_from_cgroup(text: str) -> str | None:
    """The container id in a /proc/PID/cgroup file or a cgroup path, None on the host."""
    for line in text.splitlines():
        path = line.rsplit(":", 1)[-1]
        match = _CONTAINER_ID.search(path)
        if match:
            return match.group(1)
    return None


def in_cgroup(pid: int, directory: Path, proc: Path = Path("/proc")) -> bool:
    """Whether pid's cgroup v2 is directory or below it."""
    root = cgroup2_mount()
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return False
    if root is None:
        return False
    for line in text.splitlines():
        if line.startswith("0::"):
            path = (root / line[3:].lstrip("/")).resolve()
            wanted = directory.resolve()
            return path == wanted or wanted in path.parents
    return False


class UserNames:
    def __init__(self) -> None:
        self._cache: dict[int, str | None] = {}

    def name(self, uid: int) -> str | None:
        if uid not in self._cache:
            try:
                self._cache[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._cache[uid] = None
        return self._cache[uid]


class ProcessRegistry:
    def __init__(
        self, proc: Path = Path("/proc"), environment: EnvironmentReader | None = None
    ) -> None:
        self._proc = proc
        self.environment = environment or EnvironmentReader()
        self._known: OrderedDict[int, ProcessInfo] = OrderedDict()
        self._exited: dict[int, float] = {}
        self._users = UserNames()

    def __len__(self) -> int:
        return len(self._known)

    def scan(self) -> int:
        """Reads every process already running; returns how many were found."""
        found = 0
        for entry in self._proc.iterdir():
            if entry.name.isdigit():
                info = self._read_proc(int(entry.name))
                if info is not None:
                    self._remember(info)
                    found += 1
        return found

    def children(self, pid: int) -> set[int]:
        """pid and every descendant now running (for --pid on a process tree)."""
        parents: dict[int, int] = {}
        for entry in self._proc.iterdir():
            if entry.name.isdigit():
                ppid = self._read_ppid(int(entry.name))
                if ppid is not None:
                    parents[int(entry.name)] = ppid
        tree = {pid}
        for _ in range(64):  # bounded depth
            grown = {child for child, parent in parents.items() if parent in tree} | tree
            if grown == tree:
                break
            tree = grown
        return tree

    def on_exec(self, event: Exec) -> ProcessInfo:
        # The event's argv is capped (512 bytes); /proc has it whole while the process
        # lives, and it is this exec's if its first argument agrees.
        cmdline = self._read_cmdline(event.task.pid)
        if cmdline is None or cmdline[:1] != event.argv[:1]:
            cmdline = event.argv
        info = ProcessInfo(
            pid=event.task.pid,
            exe=self._readlink_exe(event.task.pid) or _resolved(event.filename),
            comm=event.task.comm,
            cmdline=cmdline,
            uid=event.task.uid,
            user=self._users.name(event.task.uid),
            container_id=self._read_container(event.task.pid)
            or container_id_from_cgroup(event.cgroup_name),
            ppid=event.ppid,
        )
        info = self._with_environment(info)
        self._exited.pop(info.pid, None)
        self._remember(info)
        return info

    def on_exit(self, event: Exit) -> None:
        # Kept in exit order (re-inserted), so expiry stops at the first one still young.
        self._exited.pop(event.task.pid, None)
        self._exited[event.task.pid] = time.monotonic()
        self._expire()

    def lookup(self, task: Task) -> ProcessInfo:
        """The process behind a task; falls back to what the event itself carries."""
        info = self._known.get(task.pid)
        if info is not None:
            return info
        info = self._read_proc(task.pid)
        if info is None:
            info = ProcessInfo(
                pid=task.pid,
                exe=None,
                comm=task.comm,
                cmdline=(),
                uid=task.uid,
                user=self._users.name(task.uid),
                container_id=None,
            )
        self._remember(info)
        return info

    def tags_of(self, pid: int) -> Tags:
        """A known process's tags (no /proc read: called for every record)."""
        info = self._known.get(pid)
        return info.tags if info is not None else ()

    def strategy_of(self, pid: int) -> StrategyName:
        """A known process's QPOINT_STRATEGY as it applies to its executable."""
        info = self._known.get(pid)
        return info.strategy if info is not None else "observe"

    def read(self, pid: int) -> ProcessInfo | None:
        """The process as /proc has it now, not remembered: safe from any thread."""
        return self._read_proc(pid)

    def _remember(self, info: ProcessInfo) -> None:
        self._known[info.pid] = info
        self._known.move_to_end(info.pid)
        while len(self._known) > _MAX_PROCESSES:
            self._known.popitem(last=False)

    def _expire(self) -> None:
        deadline = time.monotonic() - _EXITED_GRACE_S
        while self._exited:
            pid, when = next(iter(self._exited.items()))
            if when >= deadline:
                break
            del self._exited[pid]
            self._known.pop(pid, None)

    def _read_proc(self, pid: int) -> ProcessInfo | None:
        base = self._proc / str(pid)
        try:
            status = (base / "status").read_text()
        except OSError:
            return None
        cmdline = self._read_cmdline(pid)
        if cmdline is None:
            return None
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        uid = int(fields.get("Uid", "0").split()[0])
        info = ProcessInfo(
            pid=pid,
            exe=self._readlink_exe(pid),
            comm=fields.get("Name", "").strip(),
            cmdline=cmdline,
            uid=uid,
            user=self._users.name(uid),
            container_id=self._read_container(pid),
            ppid=int(fields["PPid"]) if "PPid" in fields else None,
        )
        return self._with_environment(info)

    def _with_environment(self, info: ProcessInfo) -> ProcessInfo:
        """Tags and strategy from /proc/PID/environ (none once the process is gone)."""
        tags, spec = self.environment.read(info.pid, self._proc)
        strategy = spec.for_exe(info.exe)
        if not tags and strategy == "observe":
            return info
        return dataclasses.replace(info, tags=tags, strategy=strategy)

    def _read_cmdline(self, pid: int) -> tuple[str, ...] | None:
        try:
            raw = (self._proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return None
        return tuple(part.decode("utf-8", "backslashreplace") for part in raw.split(b"\0") if part)

    def _read_ppid(self, pid: int) -> int | None:
        try:
            stat = (self._proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        # comm may hold spaces and parentheses: the fields after the last ')' are fixed.
        rest = stat.rsplit(")", 1)[-1].split()
        return int(rest[1]) if len(rest) > 1 else None

    def _readlink_exe(self, pid: int) -> str | None:
        try:
            return os.readlink(self._proc / str(pid) / "exe")
        except OSError:
            return None

    def _read_container(self, pid: int) -> str | None:
        try:
            return container_id_from_cgroup((self._proc / str(pid) / "cgroup").read_text())
        except OSError:
            return None
