"""TLS probes (the plug-ins of tls/plugins: OpenSSL, Go crypto/tls, node): attached per
file (device and inode), for every process or for one.

A file is examined the first time a traced process is seen running code from it: at
start for the host's libssl and every process, at exec for the new executable, and when a
process opens a connection (libraries loaded since, with dlopen).

Two ways to attach, measured in the README:
- "file": one set of probes per file, for every process that maps it; the kernel's pid
  and cgroup filters decide whose calls are captured, but every process pays the trap.
- "process": one set per traced process and file (--pid): the kernel installs the
  breakpoints in those processes only, so the others pay nothing. Forked children get
  their own probes from a fork event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flowtap.discovery.cache import ClassCache, Entry, Identity
from flowtap.discovery.roots import open_in_root
from flowtap.loader.btf import Btf
from flowtap.loader.errors import BpfError
from flowtap.loader.libbpf import BpfLink, BpfObject
from flowtap.tls import plugins
from flowtap.tls.elf import ElfImage, ElfReadError, contains_any
from flowtap.tls.libraries import (
    FileKey,
    MappedFile,
    executable_mappings,
    file_key,
    mapped_deleted_files,
    system_tls_libraries,
)
from flowtap.tls.plugins import Library, NotProbedError, TlsPlan
from flowtap.tls.plugins.base import Undo

log = logging.getLogger("flowtap.tls")

AttachMode = Literal["file", "process"]
ALL_PROCESSES = -1
# A process's maps are read again on a new connection at most this often (dlopen).
_RESCAN_INTERVAL_S = 2.0
# Process mode: new per-process attachments per second. Each one makes the kernel walk
# every process that maps the file, so a fork storm must not stall the consumer; those
# over the budget are tried again at their next connection.
_PROCESS_ATTACH_PER_S = 20
# Bigger files are not searched (node is 100 MB): reading gigabytes would keep the
# discovery worker from every other file for seconds.
_MAX_FILE_BYTES = 2 << 30


class LinkReaper:
    """Destroys uprobe links away from the event loop: each destroy takes ~100 ms here
    (the kernel waits for a grace period on every uprobe unregister, one at a time)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[BpfLink | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()

    def put(self, links: list[BpfLink]) -> None:
        if not links:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flowtap-unprobe", daemon=True)
            self._thread.start()
        with self._lock:
            self._pending += len(links)
        for link in links:
            self._queue.put(link)

    def _run(self) -> None:
        while (link := self._queue.get()) is not None:
            link.destroy()
            with self._lock:
                self._pending -= 1

    def finish(self, timeout_s: float) -> int:
        """Waits (bounded) for the queued links; returns how many are left, which the
        kernel releases when the sensor exits."""
        if self._thread is None:
            return 0
        self._queue.put(None)
        self._thread.join(timeout_s)
        with self._lock:
            return self._pending


@dataclass(slots=True)
class AttachedFile:
    path: str
    placement: TlsPlan[Any]
    links: list[BpfLink] = field(default_factory=list)
    # File mode: an O_PATH descriptor of the file, to tell when it is deleted.
    handle: int | None = None
    undo: Undo | None = None  # the plug-in's per-file kernel state, removed with the links

    def release(self, reaper: LinkReaper) -> None:
        if self.undo is not None:
            self.undo()
            self.undo = None
        reaper.put(self.links)
        self.links = []
        if self.handle is not None:
            os.close(self.handle)
            self.handle = None


@dataclass(slots=True)
class TlsStats:
    files_examined: int = 0
    cache_hits: int = 0  # files the persistent cache knew to need nothing
    attach_failures: int = 0
    attach_deferred: int = 0  # process mode: over the per-second budget, retried later
    files_released: int = 0  # probed files deleted and no longer run: their probes removed
    attached: list[dict[str, object]] = field(default_factory=list)


class TlsProbes:
    """Finds the files with TLS code that traced processes run, and keeps them probed."""

    def __init__(
        self,
        obj: BpfObject,
        mode: AttachMode = "file",
        *,
        internal: bool = True,
        program_name: Callable[[str], str] = str,
        cache: ClassCache | None = None,
        libraries: tuple[Library, ...] = plugins.LIBRARIES,
        uprobe_multi: bool = False,
    ) -> None:
        self._obj = obj
        # One link per program and file (Linux 6.6), not one perf event per address.
        self._uprobe_multi = uprobe_multi
        self._libraries = libraries  # the plug-ins not switched off (--tls-probes)
        # The build of each program this kernel loaded (ssl_return or ssl_return_bounded).
        self._program_name = program_name
        self.mode: AttachMode = mode
        self._internal = internal
        self._cache = cache
        self._placements: dict[FileKey, TlsPlan[Any] | None] = {}
        # The identity each placement was read from: a file rewritten in place keeps its
        # inode, and is read again.
        self._identities: dict[FileKey, Identity] = {}
        self._attached: dict[tuple[int, FileKey], AttachedFile] = {}
        self._scanned_at: dict[int, float] = {}
        self._connected: set[int] = set()  # processes whose first connection was seen
        self._budget_second = 0
        self._budget_left = _PROCESS_ATTACH_PER_S
        self._reaper = LinkReaper()
        self._btf: Btf | None = None  # read when a Go executable first needs it
        self.last_inspect_ms = 0.0  # how long the last file read took (for the gate's log)
        self.stats = TlsStats()

    def attach_system_libraries(self) -> None:
        """The host's libssl, before any process maps it (file mode only: in process
        mode there is no process to attach it to yet)."""
        if self.mode != "file":
            return
        for path in system_tls_libraries(self.shared_libraries):
            try:
                key = file_key(path)
            except OSError:
                continue
            self._probe(ALL_PROCESSES, MappedFile(key, str(path), path))

    def probe_staged(self, path: Path, pid: int) -> bool:
        """A file the sensor put in place for a process (the Java shim), probed before
        the process maps it; False when it was not probed (the log says why)."""
        try:
            key = file_key(path)
        except OSError as exc:
            log.warning("%s: not probed: %s", path, exc)
            return False
        target = ALL_PROCESSES if self.mode == "file" else pid
        self._probe(target, MappedFile(key, str(path), path), budgeted=False)
        return (target, key) in self._attached

    @property
    def shared_libraries(self) -> tuple[str, ...]:
        """What the switched-on plug-ins look for before any process maps it."""
        return plugins.shared_libraries(self._libraries)

    def scan_process(self, pid: int, *, budgeted: bool = True) -> None:
        self._scanned_at[pid] = time.monotonic()
        target = ALL_PROCESSES if self.mode == "file" else pid
        for mapped in executable_mappings(pid):
            if not self._probe(target, mapped, budgeted=budgeted):
                self.stats.attach_deferred += 1
                self._connected.discard(pid)  # its next connection tries again
                return

    def _take_budget(self) -> bool:
        second = int(time.monotonic())
        if second != self._budget_second:
            self._budget_second, self._budget_left = second, _PROCESS_ATTACH_PER_S
        if self._budget_left <= 0:
            return False
        self._budget_left -= 1
        return True

    def scan_all(self, pids: list[int]) -> None:
        """At start: every process, whatever the budget."""
        for pid in pids:
            self.scan_process(pid, budgeted=False)

    def on_exec(self, pid: int) -> None:
        """A traced program started: its executable now (OpenSSL linked in); its shared
        libraries are mapped after this, and are looked at on its first connection. (In
        process mode, probes follow the task: those on a file the new image maps again
        still work.)"""
        self.scan_process(pid)
        self._connected.discard(pid)

    def on_fork(self, pid: int) -> None:
        """A traced process forked (process mode): the child maps what its parent did."""
        self.scan_process(pid)

    def on_connection(self, pid: int) -> None:
        """A traced process opened a connection: look for libraries loaded meanwhile."""
        last = self._scanned_at.get(pid)
        first = pid not in self._connected
        if first or last is None or time.monotonic() - last >= _RESCAN_INTERVAL_S:
            self._connected.add(pid)
            self.scan_process(pid)

    def forget_process(self, pid: int) -> None:
        self._scanned_at.pop(pid, None)
        self._connected.discard(pid)
        self._drop_process_links(pid)

    def _drop_process_links(self, pid: int) -> None:
        if self.mode != "process":
            return
        for key in [key for key in self._attached if key[0] == pid]:
            self._attached.pop(key).release(self._reaper)

    def _probe(self, pid: int, mapped: MappedFile, *, budgeted: bool = True) -> bool:
        """Attaches to the file for pid if it has OpenSSL; False when the per-process
        budget says not now."""
        if not self._classify(mapped):
            return True
        if (pid, mapped.key) in self._attached:
            return True
        placement = self._placements[mapped.key]
        if placement is None:
            return True
        if pid != ALL_PROCESSES and budgeted and not self._take_budget():
            return False
        self._attach(pid, mapped, placement)
        return True

    def _classify(self, mapped: MappedFile) -> bool:
        """Reads the file's placement once per identity (the persistent cache first);
        False when the file cannot be reached now."""
        access = _reachable(mapped)
        try:
            if access is None:
                raise FileNotFoundError(mapped.path)
            identity = Identity.of(os.stat(access))
        except OSError as exc:
            # Gone with its process: the next process that maps it tries again.
            log.debug("%s: not examined: %s", mapped.path, exc)
            return mapped.key in self._placements
        known = self._identities.get(mapped.key)
        # The key pins the file; its size and mtime tell a rewrite in place. Not its
        # device and inode: an overlay file stat()ed by path and through a process's
        # map_files shows the overlay's, then the layer's (tls/identity.py).
        unchanged = known is not None and (known.size, known.mtime_ns) == (
            identity.size,
            identity.mtime_ns,
        )
        if unchanged and mapped.key in self._placements:
            return True
        if known is not None and not unchanged:
            self._forget_file(mapped.key)
        entry = self._cache.lookup(identity) if self._cache is not None else None
        if entry is not None and entry.verdict == "nothing":
            self.stats.cache_hits += 1
            plan: TlsPlan[Any] | None = None
        else:
            started = time.monotonic()
            try:
                plan = inspect_file(
                    Path(access), mapped.path, internal=self._internal, libraries=self._libraries
                )
            except OSError as exc:
                log.debug("%s: not examined: %s", mapped.path, exc)
                return False
            self.stats.files_examined += 1
            self.last_inspect_ms = (time.monotonic() - started) * 1000
            # "nothing" is only true of every plug-in: with some switched off, a later run
            # with them on must read the file again.
            complete = self._libraries == plugins.LIBRARIES
            if self._cache is not None and (plan is not None or complete):
                verdict = (
                    Entry("probe", mapped.path, plan.kind)
                    if plan
                    else Entry("nothing", mapped.path)
                )
                self._cache.record(identity, verdict)
        self._placements[mapped.key] = plan
        self._identities[mapped.key] = identity
        return True

    def _forget_file(self, key: FileKey) -> None:
        """A file changed in place: its old probes go (their offsets were for other code)."""
        self._placements.pop(key, None)
        self._identities.pop(key, None)
        for attached_key in [k for k in self._attached if k[1] == key]:
            self._attached.pop(attached_key).release(self._reaper)

    def release_deleted(self) -> int:
        """File mode, on the worker: removes the probes of files that were deleted (a
        deploy replaced them, a build tree was cleaned) and that no process runs any more.
        Their links would pin each old file's disk space and uprobes until the sensor
        stops; a host that deploys daily must not pile them up. Returns how many."""
        deleted: dict[tuple[int, int], FileKey] = {}
        for (pid, key), attached in self._attached.items():
            if pid != ALL_PROCESSES or attached.handle is None:
                continue
            try:
                st = os.fstat(attached.handle)
            except OSError:
                continue
            if st.st_nlink == 0:
                deleted[(st.st_dev, st.st_ino)] = key
        if not deleted:
            return 0
        for still_mapped in mapped_deleted_files():
            deleted.pop(still_mapped, None)
        for key in deleted.values():
            identity = self._identities.get(key)
            self._forget_file(key)
            if identity is not None and self._cache is not None:
                self._cache.forget(identity)
        self.stats.files_released += len(deleted)
        if deleted:
            log.debug("probes removed from %d deleted files", len(deleted))
        return len(deleted)

    def probe_file(self, access: str, shown_as: str, *, attach: bool = True) -> TlsPlan[Any] | None:
        """One file, open as `access` (/proc/self/fd/N: the exec gate's file, a private
        root's libssl): classified once per identity and, in file mode and if asked,
        probed for every process. Its placement, None when there is nothing to probe."""
        mapped = MappedFile(file_key(Path(access)), shown_as, Path(access))
        if self.mode == "file" and attach:
            self._probe(ALL_PROCESSES, mapped)
        else:
            self._classify(mapped)
        return self._placements.get(mapped.key)

    def probed_for_all(self, access: str) -> bool:
        """Whether the file open as access is probed for every process already."""
        return (ALL_PROCESSES, file_key(Path(access))) in self._attached

    def on_exec_file(self, pid: int, parent: int, filename: str) -> None:
        """Without the exec gate: the file named in the exec event, reached in the
        process's root, else (it has exited) in its parent's, else in ours, so that at
        least the next run of that file is probed."""
        roots = [f"/proc/{pid}/root", f"/proc/{parent}/root", "/"]
        if not filename.startswith("/"):
            roots = [f"/proc/{pid}/cwd"]
        for root in roots:
            try:
                root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fd = open_in_root(root_fd, filename)
            except OSError:
                continue
            finally:
                os.close(root_fd)
            try:
                self.probe_file(f"/proc/self/fd/{fd}", filename)
            finally:
                os.close(fd)
            return

    def _attach(self, pid: int, mapped: MappedFile, placement: TlsPlan[Any]) -> None:
        attached = AttachedFile(mapped.path, placement)
        target = _reachable(mapped)
        if target is None:
            # The process is gone, and the file is not at its path here: the next process
            # that maps it brings a way to reach it.
            self._placements.pop(mapped.key, None)
            self._identities.pop(mapped.key, None)
            log.debug("%s: gone before it could be probed", mapped.path)
            return
        try:
            for link in self._link(target, placement, pid):
                attached.links.append(link)
        except BpfError as exc:
            self.stats.attach_failures += 1
            for link in attached.links:
                link.destroy()
            # Only once per file: a failure is remembered as "nothing to probe".
            self._placements[mapped.key] = None
            log.warning("TLS probes not attached to %s: %s", mapped.path, exc)
            return
        if pid == ALL_PROCESSES:
            # Gone meanwhile (no handle): its probes stay until the sensor stops.
            with contextlib.suppress(OSError):
                attached.handle = os.open(target, os.O_PATH | os.O_CLOEXEC)
        self._attached[(pid, mapped.key)] = attached
        attached.undo = placement.after_attach(
            self, path=mapped.path, key=mapped.key, target=target
        )
        scope = "every process" if pid == ALL_PROCESSES else f"pid {pid}"
        if pid == ALL_PROCESSES or len(self.stats.attached) < 1000:
            self.stats.attached.append(
                {
                    "path": mapped.path,
                    "pid": pid,
                    "placement": placement.kind,
                    "detail": placement.describe(),
                }
            )
        log.info(
            "%s probes attached to %s (%s): %s",
            placement.library.log_name,
            mapped.path,
            scope,
            placement.describe(),
        )

    def _link(self, target: str, placement: TlsPlan[Any], pid: int) -> Iterator[BpfLink]:
        """The links of a placement: one per program (uprobe_multi), else one per site.
        Each link is yielded as made, so that a failure leaves the made ones to destroy."""
        if not self._uprobe_multi:
            for site in placement.sites():
                program = self._obj.program(self._program_name(site.program))
                yield program.attach_uprobe(target, site.offset, pid=pid, retprobe=site.retprobe)
            return
        groups: dict[tuple[str, bool], list[int]] = {}
        for site in placement.sites():
            groups.setdefault((site.program, site.retprobe), []).append(site.offset)
        for (name, retprobe), offsets in groups.items():
            program = self._obj.program(self._program_name(name))
            yield program.attach_uprobe_multi(target, offsets, pid=pid, retprobe=retprobe)

    # --- what plug-ins may touch after attaching (plugins.AttachContext) ---------------

    def set_flag(self, name: str) -> None:
        """Sets the one-entry u32 array map `name` (tls_stopped, go_probed) to 1."""
        try:
            self._obj.map(name).update(b"\0\0\0\0", b"\1\0\0\0")
        except BpfError as exc:
            log.warning("could not set %s: %s", name, exc)

    def update_map(self, name: str, key: bytes, value: bytes) -> None:
        self._obj.map(name).update(key, value)

    def delete_map(self, name: str, key: bytes) -> None:
        try:
            self._obj.map(name).delete(key)
        except BpfError as exc:
            log.warning("could not delete from %s: %s", name, exc)

    def btf(self) -> Btf:
        """The object's BTF, read when a plug-in first needs it."""
        if self._btf is None:
            self._btf = Btf(self._obj)
        return self._btf

    def detach(self, timeout_s: float = 10.0) -> None:
        # First, every probe stops capturing at once; then the links go, one by one.
        self.set_flag("tls_stopped")
        for attached in self._attached.values():
            attached.release(self._reaper)
        self._attached.clear()
        left = self._reaper.finish(timeout_s)
        if left:
            log.warning("%d TLS probe links are left for the kernel to release at exit", left)


def _reachable(mapped: MappedFile) -> str | None:
    """A path to the mapped file that works now: through the process while it lives, else
    its own path when that is the same file (the process exited meanwhile)."""
    if os.path.exists(mapped.access):
        return str(mapped.access)
    try:
        same = file_key(Path(mapped.path)) == mapped.key
    except OSError:
        return None
    return mapped.path if same else None


def inspect_file(
    access: Path,
    shown_as: str,
    *,
    internal: bool = True,
    libraries: tuple[Library, ...] = plugins.LIBRARIES,
) -> TlsPlan[Any] | None:
    """Where to probe this file: the plan of the first plug-in that claims it, None when
    there is nothing to probe. Raises OSError only when the file cannot be read (its
    process is gone): a damaged or hostile file on the host never stops the sensor."""
    try:
        size = access.stat().st_size
        if size > _MAX_FILE_BYTES:
            log.info("%s: not examined: %d bytes, more than any TLS program", shown_as, size)
            return None
        if not contains_any(access, plugins.signatures(libraries)):
            return None
        with ElfImage(access) as image:
            for library in plugins.LIBRARIES:
                if library not in libraries:
                    if library.owns(image, access):
                        log.debug("%s: %s, switched off (--tls-probes)", shown_as, library.name)
                        return None
                    continue
                found = library.classify(image, access, internal=internal)
                if found is not None:
                    return TlsPlan(library, found)
    except NotProbedError as exc:
        log.warning("%s: %s", shown_as, exc)
    except ElfReadError as exc:
        log.debug("%s: not examined: %s", shown_as, exc)
    except OSError:
        raise  # unreadable now, perhaps not later
    except Exception as exc:  # the ELF library's errors are not one family
        log.warning("%s: not examined, unreadable ELF: %s: %s", shown_as, type(exc).__name__, exc)
    return None


def running_pids(proc: Path = Path("/proc")) -> list[int]:
    return sorted(int(name) for name in os.listdir(proc) if name.isdigit())
