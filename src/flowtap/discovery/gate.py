"""The exec gate: fanotify holds each exec of a never-seen file until it is classified
and, if it carries TLS code, probed; then allows it. Never denies. See
docs/program-start.md.

Threads: the answering thread (here) reads permission events and answers them; it never
runs a subprocess, never takes a lock another thread holds across a blocking call, and
answers at the deadline whatever the worker is doing. The discovery worker classifies and
attaches. A file known to need nothing more carries a fanotify ignore mark, so its execs
never reach this process again: a stopped (SIGSTOP) sensor holds only never-seen files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowtap.discovery.cache import ClassCache, Identity
from flowtap.discovery.fanotify import FAN_OPEN_EXEC_PERM, Fanotify, FanotifyError, PermissionEvent
from flowtap.discovery.roots import RootKey, root_key, tls_libraries
from flowtap.discovery.worker import DiscoveryWorker
from flowtap.tls.attach import TlsProbes

log = logging.getLogger("flowtap.discovery")

# Filesystems that hold no programs (or cannot be marked).
_PSEUDO_FILESYSTEMS = frozenset(
    {
        *("proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs"),
        *("securityfs", "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "autofs"),
        *("binfmt_misc", "efivarfs", "nsfs", "rpc_pipefs", "selinuxfs", "devtmpfs"),
    }
)
# Network and FUSE filesystems are not marked by default: reading a held file there waits
# on a server (or on a FUSE daemon that may itself be held), and the worker would wait
# with it. --exec-gate-path marks them when asked.
_REMOTE_FILESYSTEMS = ("fuse", "nfs", "cifs", "smb3", "9p", "ceph", "glusterfs", "afs")
_MAX_ANCESTRY = 32
_RESTORE_BUDGET_S = 2.0
_MAX_RESTORED_MARKS = 100_000
_MAX_HOLD_SAMPLES = 10_000


@dataclass(slots=True)
class GateStats:
    held: int = 0  # execs held for classification
    passed_known: int = 0  # answered at once: file known (its ignore mark not yet set)
    passed_own: int = 0  # the sensor's own descendants
    passed_out_of_scope: int = 0
    expired: int = 0  # allowed at the deadline; attaching finished in the background
    finished_late: int = 0  # of those, classified and probed after the deadline
    marks_restored: int = 0
    hold_ms: list[float] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        samples = self.hold_ms
        return {
            "held": self.held,
            "passed_known": self.passed_known,
            "passed_own": self.passed_own,
            "passed_out_of_scope": self.passed_out_of_scope,
            "expired": self.expired,
            "finished_late": self.finished_late,
            "marks_restored": self.marks_restored,
            "hold_ms_p50": round(statistics.median(samples), 1) if samples else None,
            "hold_ms_max": round(max(samples), 1) if samples else None,
        }


@dataclass(slots=True)
class _Held:
    fd: int
    pid: int
    path: str
    started: float
    deadline: float


def filesystems(paths: tuple[Path, ...]) -> list[str]:
    """One mount point per filesystem to mark: those of `paths`, or every mounted one
    that can hold programs (not pseudo filesystems, not noexec)."""
    if paths:
        return [str(path) for path in paths]
    found: dict[int, str] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        kind = fields[2] if len(fields) >= 4 else ""
        if not kind or kind in _PSEUDO_FILESYSTEMS or kind.startswith(_REMOTE_FILESYSTEMS):
            continue
        if "noexec" in fields[3].split(","):
            continue
        point = fields[1].replace("\\040", " ")
        with contextlib.suppress(OSError):
            found.setdefault(os.stat(point).st_dev, point)
    return list(found.values())


def own_descendant(pid: int, me: int) -> bool:
    """Whether pid is this process or one it started (its children never wait on it)."""
    for _ in range(_MAX_ANCESTRY):
        if pid == me:
            return True
        if pid <= 1:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        rest = stat.rsplit(")", 1)[-1].split()
        pid = int(rest[1]) if len(rest) > 1 else 0
    return False


class ExecGate:
    def __init__(
        self,
        tls: TlsProbes,
        worker: DiscoveryWorker,
        cache: ClassCache,
        *,
        hold_s: float,
        in_scope: Callable[[int], bool],
        paths: tuple[Path, ...] = (),
        test_delay_s: float = 0.0,
    ) -> None:
        self._tls = tls
        self._worker = worker
        self._cache = cache
        self._hold_s = hold_s
        self._in_scope = in_scope
        self._paths = paths
        self._test_delay_s = test_delay_s
        self._fanotify: Fanotify | None = None
        self._held: dict[int, _Held] = {}  # by event fd; the answering thread's alone
        self._done: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._roots: set[RootKey] = set()  # roots whose libssl was looked for
        self._me = os.getpid()
        self.stats = GateStats()
        self.marked: list[str] = []
        self._whole_filesystems: set[int] = set()  # st_dev of those marked as filesystems

    def start(self) -> None:
        """Marks the filesystems and starts answering; FanotifyError if unavailable."""
        # With vfork, CPython's subprocess keeps the GIL until the child execs; a child
        # exec held by this gate would then wait on the thread that answers it.
        setattr(subprocess, "_USE_VFORK", False)  # noqa: B010 (private, not in typeshed)
        fan = Fanotify()
        try:
            for point in filesystems(self._paths):
                try:
                    fan.watch_filesystem(point)
                    self._whole_filesystems.add(os.stat(point).st_dev)
                except FanotifyError as exc:
                    log.debug("exec gate: %s not marked as a filesystem: %s", point, exc)
                    try:
                        fan.watch_mount(point)
                    except FanotifyError as mount_exc:
                        log.debug("exec gate: %s not marked: %s", point, mount_exc)
                        continue
                self.marked.append(point)
            if not self.marked:
                raise FanotifyError(0, "no filesystem could be marked")
        except BaseException:
            fan.close()
            raise
        self._fanotify = fan
        own_root = root_key(self._me)
        if own_root is not None:
            self._roots.add(own_root)  # the host's libssl is probed at start
        self._restore_marks()
        self._thread = threading.Thread(target=self._answer, name="flowtap-execgate", daemon=True)
        self._thread.start()

    def _restore_marks(self) -> None:
        """Files the cache knows to need nothing get their ignore marks back, so that a
        restarted (or stopped) sensor never holds them."""
        assert self._fanotify is not None
        deadline = time.monotonic() + _RESTORE_BUDGET_S
        for identity, entry in self._cache.items()[:_MAX_RESTORED_MARKS]:
            if entry.verdict != "nothing":
                continue
            if time.monotonic() > deadline:
                log.info("exec gate: ignore marks restored for %d files", self.stats.marks_restored)
                return
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if Identity.of_fd(fd) == identity:
                    self._fanotify.ignore(fd)
                    self.stats.marks_restored += 1
            except OSError:
                pass
            finally:
                os.close(fd)

    # --- the answering thread -------------------------------------------------------

    def _answer(self) -> None:
        fan = self._fanotify
        assert fan is not None
        poller = select.poll()
        poller.register(fan.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = 500.0
            if self._held:
                first = min(held.deadline for held in self._held.values())
                timeout = max(0.0, (first - now) * 1000)
            for fd, _mask in poller.poll(timeout):
                if fd == fan.fd:
                    for event in self._read(fan):
                        self._on_event_safely(fan, event)
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
            self._finish_done(fan)
            self._expire(fan, time.monotonic())

    def _read(self, fan: Fanotify) -> list[PermissionEvent]:
        try:
            return fan.read()
        except OSError as exc:
            self._say(logging.WARNING, "exec gate: unreadable events: %s", exc)
            return []

    def _on_event_safely(self, fan: Fanotify, event: PermissionEvent) -> None:
        """Whatever goes wrong, the exec is answered (now, or at its deadline if held)."""
        try:
            self._on_event(fan, event)
        except Exception as exc:  # this thread must outlive any one event
            self._say(logging.WARNING, "exec gate: pid %d allowed unexamined: %r", event.pid, exc)
            if event.fd >= 0 and event.fd not in self._held:
                self._allow(fan, event.fd)

    def _on_event(self, fan: Fanotify, event: PermissionEvent) -> None:
        if event.fd < 0:
            return  # queue overflow: nothing to answer
        if not event.mask & FAN_OPEN_EXEC_PERM:
            self._allow(fan, event.fd)
            return
        if own_descendant(event.pid, self._me):
            self.stats.passed_own += 1
            self._allow(fan, event.fd)
            return
        if not self._in_scope(event.pid):
            # Not held, but learnt in the background: once known to need nothing, the
            # file's ignore mark keeps its execs away from this process for everybody.
            self.stats.passed_out_of_scope += 1
            with contextlib.suppress(OSError):
                work_fd = os.dup(event.fd)
                if not self._worker.submit(lambda: self._learn(work_fd)):
                    os.close(work_fd)
            self._allow(fan, event.fd)
            return
        access = f"/proc/self/fd/{event.fd}"
        try:
            entry = self._cache.lookup(Identity.of_fd(event.fd))
            path = os.readlink(access)
        except OSError:
            self._allow(fan, event.fd)
            return
        root = root_key(event.pid)
        new_root = root is not None and root not in self._roots
        known = entry is not None and (
            entry.verdict == "nothing" or self._tls.probed_for_all(access)
        )
        if known and not new_root:
            self.stats.passed_known += 1
            with contextlib.suppress(OSError):
                fan.ignore(event.fd)
            self._allow(fan, event.fd)
            return
        if root is not None:
            self._roots.add(root)
        now = time.monotonic()
        self.stats.held += 1
        self._held[event.fd] = _Held(event.fd, event.pid, path, now, now + self._hold_s)
        # The worker gets its own descriptor: this one is closed when the exec is
        # answered, which may come first (the deadline).
        work_fd = os.dup(event.fd)
        self._worker.submit(
            lambda: self._classify(event.fd, work_fd, event.pid, path, new_root), urgent=True
        )

    def _finish_done(self, fan: Fanotify) -> None:
        while True:
            try:
                fd = self._done.get_nowait()
            except queue.Empty:
                return
            held = self._held.pop(fd, None)
            if held is None:
                self.stats.finished_late += 1
                continue
            elapsed_ms = (time.monotonic() - held.started) * 1000
            if len(self.stats.hold_ms) < _MAX_HOLD_SAMPLES:
                self.stats.hold_ms.append(elapsed_ms)
            self._say(
                logging.DEBUG, "exec held %.1f ms: %s (pid %d)", elapsed_ms, held.path, held.pid
            )
            self._allow(fan, fd)

    def _expire(self, fan: Fanotify, now: float) -> None:
        for fd, held in list(self._held.items()):
            if now >= held.deadline:
                del self._held[fd]
                self.stats.expired += 1
                self._say(
                    logging.INFO,
                    "exec of %s (pid %d) allowed at the %.0f ms deadline; its probes are "
                    "attached in the background",
                    held.path,
                    held.pid,
                    self._hold_s * 1000,
                )
                self._allow(fan, fd)

    def _say(self, level: int, message: str, *args: object) -> None:
        """Logs from the answering thread through the worker: a logging handler's lock
        may be held by a thread blocked writing to a full pipe."""
        if log.isEnabledFor(level):
            self._worker.submit(lambda: log.log(level, message, *args))

    @staticmethod
    def _allow(fan: Fanotify, fd: int) -> None:
        try:
            fan.allow(fd)
        except OSError:
            pass  # the exec was interrupted; nothing waits on this answer any more
        finally:
            os.close(fd)

    # --- on the worker ---------------------------------------------------------------

    def _classify(self, event_fd: int, fd: int, pid: int, path: str, new_root: bool) -> None:
        """Classifies and probes the held file (and a new root's libssl), then tells the
        answering thread; ignore-marks the file when nothing more is to be done for it."""
        try:
            if self._test_delay_s:
                time.sleep(self._test_delay_s)  # test-only: a slow classification
            if new_root:
                self._probe_root(pid)
            access = f"/proc/self/fd/{fd}"
            started = time.monotonic()
            self._tls.last_inspect_ms = 0.0
            plan = self._tls.probe_file(access, path)
            if plan is not None:
                log.debug(
                    "exec gate: %s read in %.1f ms, probed in %.1f ms",
                    path,
                    self._tls.last_inspect_ms,
                    (time.monotonic() - started) * 1000 - self._tls.last_inspect_ms,
                )
            done = plan is None or self._tls.probed_for_all(access) or self._tls.mode != "file"
            fan = self._fanotify
            if done and fan is not None:
                with contextlib.suppress(OSError):
                    fan.ignore(fd)
        finally:
            os.close(fd)
            self._done.put(event_fd)
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    def _learn(self, fd: int) -> None:
        """An out-of-scope exec's file: classified (never probed: nobody traced runs it
        yet), and ignore-marked if it needs nothing."""
        try:
            access = f"/proc/self/fd/{fd}"
            if self._tls.probe_file(access, os.readlink(access), attach=False) is None:
                fan = self._fanotify
                if fan is not None:
                    fan.ignore(fd)
        except OSError:
            pass  # gone, or the gate stopped meanwhile
        finally:
            os.close(fd)

    def _probe_root(self, pid: int) -> None:
        with tls_libraries(pid, self._tls.shared_libraries) as libraries:
            for path, fd in libraries:
                plan = self._tls.probe_file(f"/proc/self/fd/{fd}", f"{path} (root of pid {pid})")
                log.debug("exec gate: new root of pid %d: %s: %s", pid, path, plan and plan.kind)

    def covers(self, pid: int) -> bool:
        """Whether pid's executable is on a filesystem this gate marks whole: its exec
        was held (or its file is known) before it ran, so the exec event has nothing to
        add. False when that cannot be told (the process is gone)."""
        try:
            return os.stat(f"/proc/{pid}/exe").st_dev in self._whole_filesystems
        except OSError:
            return False

    def stop(self) -> None:
        """Closes the fanotify descriptor: the kernel allows every exec still held."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        if self._thread is not None:
            self._thread.join(5.0)
        if self._fanotify is not None:
            for fd in list(self._held):
                self._allow(self._fanotify, fd)
            self._held.clear()
            self._fanotify.close()
            self._fanotify = None
        # The wake pipe stays open until the process exits: a job still running on the
        # worker writes to it, and a closed descriptor's number may be reused by a file.
