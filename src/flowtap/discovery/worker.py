"""The discovery worker: the one thread that classifies files, reads ELF and attaches or
detaches probes. The ring-buffer consumer and the exec gate only hand it jobs, so neither
ever waits for a scan or an attach (a stalled consumer turns into kernel drops; a stalled
gate into slow execs)."""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("flowtap.discovery")

Job = Callable[[], object]
# Jobs from the consumer (rescans at connections) beyond this are dropped and counted:
# the next connection of that process asks again.
_MAX_BACKLOG = 10_000


class DiscoveryWorker:
    def __init__(self) -> None:
        # Two deques and a doorbell: append/popleft and SimpleQueue need no lock of ours,
        # so the gate's answering thread never waits on one held by anybody.
        self._urgent: collections.deque[Job] = collections.deque()
        self._normal: collections.deque[Job] = collections.deque()
        self._doorbell: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.failed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flowtap-discovery", daemon=True)
        self._thread.start()

    def submit(self, job: Job, *, urgent: bool = False) -> bool:
        """Queues a job: urgent ones (a held exec waits on them) go first. False when a
        normal job was dropped (backlog full)."""
        if urgent:
            self._urgent.append(job)
        elif len(self._normal) >= _MAX_BACKLOG:
            self.dropped += 1
            return False
        else:
            self._normal.append(job)
        self._doorbell.put(True)
        return True

    def _run(self) -> None:
        while self._doorbell.get():
            try:
                job = self._urgent.popleft()
            except IndexError:
                try:
                    job = self._normal.popleft()
                except IndexError:
                    continue
            try:
                job()
            except OSError as exc:  # out of descriptors, a process gone: no traceback
                self.failed += 1
                log.warning("discovery job failed: %s", exc)
            except Exception:  # a job's failure must not end discovery
                self.failed += 1
                log.exception("discovery job failed")

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Drops what is queued, lets the running job finish (bounded); True if it did."""
        if self._thread is None:
            return True
        self._urgent.clear()
        self._normal.clear()
        self._doorbell.put(False)
        self._thread.join(timeout_s)
        stopped = not self._thread.is_alive()
        self._thread = None
        return stopped
