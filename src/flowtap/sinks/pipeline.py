"""The output pipeline: the consumer hands each record to every sink's bounded queue and
goes on; each sink writes from its own thread.

Why: a destination that is slow (a pipe nobody reads, a busy disk) or failing must not
stall the ring-buffer consumer (that would turn into kernel drops) nor the other sinks.
What a sink cannot take (its queue is full) is counted as lost for that sink, and what it
fails to write is counted as its errors: every record is written, dropped or failed, once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from flowtap.records.connection import Record
from flowtap.sinks.base import Sink

log = logging.getLogger("flowtap")

DEFAULT_QUEUE = 10_000
# How long the exit waits for every sink to write what is queued, all sinks together.
DEFAULT_FLUSH_S = 5.0
# A failing sink (a full disk) is reported once, then at most this often, with a count.
_WARN_S = 10.0
_STOP = object()  # the end of a queue
_STOP_POLL_S = 0.01
_BATCH = 500  # records a batch sink gets in one call, at most


@runtime_checkable
class BatchSink(Protocol):
    """A sink that writes many records at once (one transaction): all or none."""

    def write_batch(self, records: list[Record]) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class SinkStats:
    written: int = 0
    errors: int = 0  # the sink refused the record (a full disk)
    dropped: int = 0  # the queue was full, or the exit's wait ran out


class SinkWorker:
    """One sink, its bounded queue and the thread that writes from it."""

    def __init__(self, name: str, sink: Sink | BatchSink, capacity: int) -> None:
        self.name = name
        self.sink = sink
        self.capacity = capacity
        self.stats = SinkStats()
        self._queue: queue.Queue[object] = queue.Queue(capacity)
        self._lock = threading.Lock()  # the in-flight record vs. abandon() at exit
        self._in_flight = 0  # records being written now
        self._abandoned = False
        self._stop_queued = False
        self._failing = False
        self._failed_since_warning = 0
        self._next_warning = 0.0
        # A sink that delivers later (OTLP) moves records it loses from written to
        # errors or dropped itself.
        bind = getattr(sink, "bind_stats", None)
        if bind is not None:
            bind(self.stats, self._lock)
        # Daemon: a sink stuck in a write must not keep the process from exiting.
        self._thread = threading.Thread(target=self._run, name=f"flowtap-sink-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Records waiting: in this queue, and in a child process's (sinks/child.py)."""
        pending = getattr(self.sink, "pending", 0)
        return self._queue.qsize() + (pending if isinstance(pending, int) else 0)

    def offer(self, record: Record) -> None:
        """Never blocks: a full queue is one record lost for this sink."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.stats.dropped += 1

    def _next(self) -> list[object] | None:
        """The next record, or for a batch sink every record waiting (up to _BATCH):
        under load a batch grows, idle each record is written at once. None: the end."""
        items = [self._queue.get()]
        if isinstance(self.sink, BatchSink):
            while len(items) < _BATCH and items[-1] is not _STOP:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        if items[-1] is _STOP:
            items.pop()
            if not items:
                return None
            with contextlib.suppress(queue.Full):  # there is room: we took this one
                self._queue.put_nowait(_STOP)  # the end, after this batch
        return items

    def _run(self) -> None:
        while (items := self._next()) is not None:
            with self._lock:
                if self._abandoned:
                    self.stats.dropped += len(items)
                    continue
                self._in_flight = len(items)
            try:
                if isinstance(self.sink, BatchSink):
                    self.sink.write_batch(items)  # type: ignore[arg-type]
                else:
                    self.sink.write(items[0])  # type: ignore[arg-type]
            except Exception as exc:  # any sink failure is counted, never fatal
                with self._lock:
                    self._in_flight = 0
                    if not self._abandoned:
                        self.stats.errors += len(items)
                self._failed(exc)
                continue
            with self._lock:
                self._in_flight = 0
                if self._abandoned:
                    continue  # already counted lost by abandon()
                self.stats.written += len(items)
            if self._failing:
                self._failing = False
                log.warning(
                    "sink %s: records are written again; %d were lost before (sink_errors)",
                    self.name,
                    self.stats.errors,
                )

    def _failed(self, exc: Exception) -> None:
        """One warning when writes start failing, then one per _WARN_S with a count: a full
        disk must not turn every lost record into a line of log."""
        self._failed_since_warning += 1
        now = time.monotonic()
        if self._failing and now < self._next_warning:
            return
        if not self._failing:
            log.warning(
                "could not write a record to sink %s: %s: %s; records are counted as "
                "sink_errors until writes succeed (a full disk: free space on the output's "
                "filesystem)",
                self.name,
                type(exc).__name__,
                exc,
            )
        else:
            log.warning(
                "still cannot write records to sink %s (%s): %d more lost, %d in all",
                self.name,
                exc,
                self._failed_since_warning,
                self.stats.errors,
            )
        self._failing = True
        self._failed_since_warning = 0
        self._next_warning = now + _WARN_S

    def ask_stop(self) -> None:
        """Queues the end mark once there is room (never blocks)."""
        if self._stop_queued:
            return
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            return
        self._stop_queued = True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def abandon(self) -> None:
        """The exit's wait ran out: what is queued or being written counts as lost."""
        with self._lock:
            if self._abandoned:
                return
            self._abandoned = True
            self.stats.dropped += self._in_flight
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                # The thread ends if its write ever returns.
                self._queue.put_nowait(_STOP)
                return
            if item is not _STOP:
                self.stats.dropped += 1


class Pipeline:
    """Every sink of a run; the consumer calls submit(), the exit calls close()."""

    def __init__(
        self,
        sinks: list[tuple[str, Sink | BatchSink]],
        *,
        capacity: int = DEFAULT_QUEUE,
        flush_s: float = DEFAULT_FLUSH_S,
        capacities: dict[str, int] | None = None,
    ) -> None:
        """capacities: a queue size for a sink by name (else capacity)."""
        names = [name for name, _sink in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must differ: {names}")
        self.flush_s = flush_s
        self.capacity = capacity
        sizes = capacities or {}
        self.workers = [SinkWorker(name, sink, sizes.get(name, capacity)) for name, sink in sinks]
        self._observers: list[Callable[[Record], None]] = []
        self._closed = False

    def observe(self, observer: Callable[[Record], None]) -> None:
        """Called with every record on the consumer's thread, before the queues (the
        endpoints' traffic counts): it must be quick and must not raise."""
        self._observers.append(observer)

    def submit(self, record: Record) -> None:
        for observer in self._observers:
            observer(record)
        for worker in self.workers:
            worker.offer(record)

    def stats(self) -> dict[str, SinkStats]:
        return {worker.name: worker.stats for worker in self.workers}

    def capacity_of(self, name: str) -> int:
        return next(worker.capacity for worker in self.workers if worker.name == name)

    def errors(self) -> int:
        return sum(worker.stats.errors for worker in self.workers)

    def dropped(self) -> dict[str, int]:
        return {worker.name: worker.stats.dropped for worker in self.workers}

    def close(self) -> None:
        """Writes what is queued (bounded: flush_s for all sinks), then closes each sink
        whose thread ended; a sink still stuck in a write is left to the process's exit."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.flush_s
        pending = list(self.workers)
        # All sinks drain at once: one stuck sink does not use up the others' wait.
        while pending and time.monotonic() < deadline:
            for worker in pending:
                worker.ask_stop()
            pending = [worker for worker in pending if worker.alive]
            if pending:
                time.sleep(_STOP_POLL_S)
        for worker in self.workers:
            if worker.alive:
                worker.abandon()
                log.warning(
                    "sink %s did not finish writing within %.0f s at exit; the records it "
                    "had not written are counted as sink_dropped (lost): %d in all",
                    worker.name,
                    self.flush_s,
                    worker.stats.dropped,
                )
                continue
            try:
                worker.sink.close()
            except Exception as exc:  # one sink's close must not stop the others'
                log.error("the output %s was not closed cleanly: %s", worker.name, exc)
