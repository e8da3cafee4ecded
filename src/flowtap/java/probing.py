"""JVMs found and given flowtap's agent, on a thread of their own.

An attach waits on the JVM (its signal handler, its attach listener, the agent's class
transformations: hundreds of milliseconds, seconds for a hostile or wedged JVM), so it
never runs on the ring-buffer consumer nor on the discovery worker, whose exec holds
must answer in milliseconds. The only TLS-probe work, probing the staged shim, is handed
to the discovery worker (the one thread that attaches probes) and awaited, bounded.

A JVM is considered when the sensor starts, when a traced program execs a JVM launcher
(then polled until libjvm is mapped and SIGQUIT is caught: signalling earlier would kill
it), and at a traced process's first connection (a JVM embedded in another program).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flowtap.java import AGENT_JAR, SHIM
from flowtap.java.attach import AttachError, load_agent
from flowtap.java.jvm import Jvm, find_jvm, vm_started
from flowtap.java.staging import Staged, stage

log = logging.getLogger("flowtap.java")

# From exec: how long a launcher may take to map libjvm and catch SIGQUIT, and how often
# to look meanwhile.
_READY_WAIT_S = 10.0
_POLL_S = 0.025
# How much of an executable is searched for the launcher's library name, and how many
# executables' answers are kept.
_LAUNCHER_READ_BYTES = 256 << 10
_MAX_KNOWN_EXECUTABLES = 4096
_LAUNCHER_MARK = b"libjli.so"
# Outcomes kept for --stats-file: the most recent ones.
_MAX_OUTCOMES = 200


@dataclass(slots=True)
class JavaStats:
    probed: int = 0
    not_probed: int = 0
    jvms: list[dict[str, object]] = field(default_factory=list)

    def note(self, outcome: dict[str, object]) -> None:
        if outcome["probed"]:
            self.probed += 1
        else:
            self.not_probed += 1
        self.jvms.append(outcome)
        del self.jvms[:-_MAX_OUTCOMES]


# What a queued pid waits for: its first look (at start or a connection; at exec), or
# another look at a JVM still starting.
_State = Literal["consider", "exec", "wait"]
ProbeShim = Callable[[Path, int], bool]  # probes a staged shim for a pid; False if not


def java_files_missing() -> str | None:
    """Why the agent cannot be loaded from this installation, None when it can."""
    missing = [str(path) for path in (AGENT_JAR, SHIM) if not path.is_file()]
    if missing:
        return f"the agent is not built ({', '.join(missing)} missing): run `make setup`"
    return None


class LauncherCache:
    """Whether an executable loads a JVM (links libjli, as `java` does), read once per
    file identity: every traced exec asks, and most are the same few programs."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._known: OrderedDict[tuple[int, int, int, int], bool] = OrderedDict()

    def is_launcher(self, pid: int) -> bool:
        try:
            with open(self._proc / str(pid) / "exe", "rb") as exe:
                st = os.fstat(exe.fileno())
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                known = self._known.get(key)
                if known is None:
                    # The name sits in .dynstr, near the start of the file.
                    known = _LAUNCHER_MARK in exe.read(_LAUNCHER_READ_BYTES)
                    self._known[key] = known
                    if len(self._known) > _MAX_KNOWN_EXECUTABLES:
                        self._known.popitem(last=False)
                return known
        except OSError:
            return False


def process_age_ms(pid: int, proc: Path = Path("/proc")) -> int | None:
    """How long ago the process started, in milliseconds (clock ticks: 10 ms here)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        uptime = float((proc / "uptime").read_text().split()[0])
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None
    return max(0, round((uptime - ticks / os.sysconf("SC_CLK_TCK")) * 1000))


def _tmp_key(jvm: Jvm) -> tuple[int, int] | None:
    """The /tmp a JVM sees (device and inode): JVMs that share it share one staging."""
    try:
        st = os.stat(f"{jvm.root}/tmp")
    except OSError:
        return None
    return st.st_dev, st.st_ino


class JavaProbes:
    def __init__(
        self,
        probe_shim: ProbeShim,
        in_scope: Callable[[int], bool],
        *,
        attach_timeout_s: float = 10.0,
        ready_wait_s: float = _READY_WAIT_S,
    ) -> None:
        self._probe_shim = probe_shim
        self._in_scope = in_scope
        self._attach_timeout_s = attach_timeout_s
        self._ready_wait_s = ready_wait_s
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._due: list[tuple[float, int, int, float, _State]] = []  # (due, order, pid, ...)
        self._order = itertools.count()
        self._seen: set[int] = set()  # pids considered since their last exec
        self._staged: dict[tuple[int, int], Staged] = {}  # by the JVM's /tmp
        self._launchers = LauncherCache()
        self._busy = False  # the thread is at work on one item
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = JavaStats()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flowtap-java", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._due.clear()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def settle(self, timeout_s: float) -> bool:
        """Waits (bounded) until every JVM considered so far is probed or refused: at
        start, so that a JVM running before the sensor is captured once it is ready."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._due or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return False
                self._wake.wait(left)
        return True

    # --- from other threads: cheap, never blocking --------------------------------

    def consider(self, pid: int) -> None:
        """At start and at a first connection: a JVM now, or never (for this image)."""
        self._queue(pid, "consider")

    def on_exec(self, pid: int) -> None:
        """A traced program started: a JVM launcher is watched until its JVM is ready."""
        with self._lock:
            self._seen.discard(pid)
        self._queue(pid, "exec")

    def forget(self, pid: int) -> None:
        with self._lock:
            self._seen.discard(pid)

    def _queue(self, pid: int, state: _State) -> None:
        with self._lock:
            if self._stopping or pid in self._seen:
                return
            self._seen.add(pid)
            now = time.monotonic()
            item = (now, next(self._order), pid, now + self._ready_wait_s, state)
            heapq.heappush(self._due, item)
            self._wake.notify_all()

    # --- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and (not self._due or self._due[0][0] > time.monotonic()):
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    self._wake.wait(wait)
                if self._stopping:
                    return
                _due, _order, pid, deadline, state = heapq.heappop(self._due)
                self._busy = True
            try:
                again = self._step(pid, deadline, state)
            except Exception:  # one JVM's failure must not end Java probing
                log.exception("java: pid %d: not probed", pid)
                again = False
            with self._lock:
                self._busy = False
                if again and not self._stopping:
                    due = time.monotonic() + _POLL_S
                    heapq.heappush(self._due, (due, next(self._order), pid, deadline, "wait"))
                self._wake.notify_all()

    def _step(self, pid: int, deadline: float, state: _State) -> bool:
        """One look at pid; True to look again shortly (a JVM still starting)."""
        if state != "wait":  # the first look: is it ours to probe at all
            if state == "exec" and not self._launchers.is_launcher(pid):
                return False
            if not self._in_scope(pid):
                return False
        jvm = find_jvm(pid)
        if jvm is None:  # a launcher maps libjvm a few milliseconds after exec
            return state != "consider" and time.monotonic() < deadline
        # Signalled before its handler is in, a JVM dies; loaded into before it has
        # started, the agent finds no system class loader.
        starting = not jvm.sigquit_caught or vm_started(jvm) is False
        if starting and time.monotonic() < deadline:
            return True
        self._load(jvm)
        return False

    def _load(self, jvm: Jvm) -> None:
        """Stages the files, probes the shim, loads the agent: attach.py refuses, before
        any signal, a JVM whose options turn attach off (it would print a thread dump)."""
        started = time.monotonic()
        try:
            jar, shim = self._stage(jvm)
            load_agent(jvm, jar, f"shim={shim}", timeout=self._attach_timeout_s)
        except AttachError as exc:
            self._not_probed(jvm, str(exc))
            return
        seconds = time.monotonic() - started
        log.info("java: pid %d (Java %s) probed in %.2f s", jvm.pid, jvm.version or "?", seconds)
        self.stats.note(
            {
                "pid": jvm.pid,
                "java_version": jvm.version,
                "probed": True,
                "seconds": round(seconds, 3),
                # From the JVM's start to its agent in place (10 ms resolution).
                "ms_after_start": process_age_ms(jvm.pid),
            }
        )

    def _stage(self, jvm: Jvm) -> tuple[str, str]:
        """The agent and the shim where this JVM can open them (staged once per /tmp),
        the shim probed before the agent loads, so that its first call is seen."""
        key = _tmp_key(jvm)
        staged = self._staged.get(key) if key is not None else None
        if staged is not None and not all(map(os.path.exists, staged.host_paths.values())):
            staged = None  # removed meanwhile (a /tmp cleaner): staged again
        if staged is None:
            staged = stage(jvm, {AGENT_JAR.name: str(AGENT_JAR), SHIM.name: str(SHIM)})
            if key is not None:
                self._staged[key] = staged
        # Idempotent per file; in process mode (--tls-attach) per JVM.
        if not self._probe_shim(Path(staged.host_paths[SHIM.name]), jvm.pid):
            raise AttachError("its copy of the shim could not be probed (see the TLS log)")
        return staged.target_paths[AGENT_JAR.name], staged.target_paths[SHIM.name]

    def _not_probed(self, jvm: Jvm, reason: str) -> None:
        log.warning("java: pid %d (Java %s) not probed: %s", jvm.pid, jvm.version or "?", reason)
        self.stats.note(
            {"pid": jvm.pid, "java_version": jvm.version, "probed": False, "reason": reason}
        )
