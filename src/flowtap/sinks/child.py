"""A sink that runs in a child process: the consumer's process only pickles records and
writes them to a pipe; the child builds the sink and writes them.

Why: a sink whose per-record work is Python (the OpenTelemetry SDK builds, validates and
encodes each log record; SQLite rows are built in Python) holds the GIL while it works, so
on the sensor's process it slows the ring-buffer consumer even on its own thread. In a
child process it runs on another core and the consumer keeps its rate.

How the counts stay exact: the child runs the sink behind the same SinkWorker as the
pipeline (a bounded queue: what it cannot take is counted dropped; what the sink refuses
is counted errors; a sink like otel moves records it loses later itself) and reports its
counts to the parent, which moves the child's errors and drops out of its own `written`.
What was sent but never settled (the child died, or did not finish at exit) is counted
dropped. So for the parent's sink, written + errors + dropped is every record it was given.

The child is started with subprocess (a fresh interpreter: nothing of the parent's threads
or descriptors is inherited), ignores SIGINT/SIGTERM (the parent decides when it ends, and
flushes it), ends at the pipe's end of file, and is killed if the parent dies
(PR_SET_PDEATHSIG; the sink must be created on a thread that lives as long as the process,
the main thread in `flowtap run`).

Wire format, both ways: a 4-byte big-endian length, then a pickle. Parent to child: the
SinkSpec, then ("batch", [records]) ..., then ("close",). Child to parent: ("ready",) or
("failed", module, class, message), then ("stats", written, errors, dropped, pending) as
they change, then ("closed", written, errors, dropped).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flowtap.records.connection import Record
from flowtap.sinks.pipeline import DEFAULT_FLUSH_S, DEFAULT_QUEUE, SinkStats, SinkWorker

log = logging.getLogger("flowtap")

_HEADER = struct.Struct("!I")
_START_TIMEOUT_S = 60.0  # the child imports its sink's packages (the SDK, gRPC)
_STATS_S = 0.1  # the child reports changed counts at most this often
# The child's sink.close() may flush for a while (otel: 10 s); the parent waits this much
# beyond the child's own flush before it kills it.
_CLOSE_MARGIN_S = 15.0
_PR_SET_PDEATHSIG = 1
# The child yields the CPU to the sensor: on a busy host the ring-buffer consumer (kernel
# drops) comes first, and an output that falls behind loses records from its bounded
# queue, counted, rather than slowing the consumer.
_NICE = 10


class ChildGoneError(RuntimeError):
    """The child process ended: records handed to it now are errors."""


@dataclass(frozen=True)
class SinkSpec:
    """How the child builds the sink: module.factory(*args, **kwargs). Picklable."""

    name: str
    module: str
    factory: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    capacity: int = DEFAULT_QUEUE  # the child's queue
    flush_s: float = DEFAULT_FLUSH_S  # how long the child's exit waits for its queue
    log_level: int = logging.INFO


def _send(fd: int, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    if data is None or len(data) < size:
        return None  # end of file (a short read on a buffered stream is the end)
    return data


def _receive(stream: IO[bytes]) -> Any:
    """The next message, or None at the end of the pipe."""
    head = _read_exact(stream, _HEADER.size)
    if head is None:
        return None
    body = _read_exact(stream, _HEADER.unpack(head)[0])
    if body is None:
        return None
    return pickle.loads(body)


class ChildSink:
    """A batch sink for the parent's pipeline: sends each batch to the child."""

    def __init__(self, spec: SinkSpec, *, start_timeout_s: float = _START_TIMEOUT_S) -> None:
        self.spec = spec
        self._stats: SinkStats | None = None
        self._stats_lock: threading.Lock | None = None
        self._lock = threading.Lock()  # the counts below, with the reader thread
        self.sent = 0  # records written to the pipe
        self._seen = (0, 0, 0)  # the child's last written, errors, dropped
        self._moved_errors = 0
        self._moved_dropped = 0
        self.pending = 0  # records waiting in the child's queue (its last report)
        self._closed_counts: tuple[int, int, int] | None = None
        self._done = threading.Event()  # the child's last message arrived (or its end)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        )
        self._process = subprocess.Popen(
            [sys.executable, "-m", "flowtap.sinks.child", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin = self._process.stdin
        self._out = self._stdin.fileno()
        self._in = self._process.stdout
        try:
            _send(self._out, spec)
            reply = self._first_reply(start_timeout_s)
        except BaseException:
            self._kill()
            raise
        if reply[0] == "failed":
            self._kill()
            raise _rebuild(reply[1], reply[2], reply[3])
        self._reader = threading.Thread(
            target=self._read, name=f"flowtap-sink-{spec.name}-child", daemon=True
        )
        self._reader.start()

    def _first_reply(self, timeout_s: float) -> tuple[Any, ...]:
        ready, _w, _x = select.select([self._in], [], [], timeout_s)
        if not ready:
            raise RuntimeError(
                f"the {self.spec.name} output's process did not start within {timeout_s:.0f} s"
            )
        reply = _receive(self._in)
        if reply is None:
            raise RuntimeError(
                f"the {self.spec.name} output's process ended at its start (exit status "
                f"{self._process.wait()}); its messages are above"
            )
        assert isinstance(reply, tuple)
        return reply

    @property
    def pid(self) -> int:
        return self._process.pid

    def bind_stats(self, stats: SinkStats, lock: threading.Lock) -> None:
        self._stats = stats
        self._stats_lock = lock

    def _move(self, errors: int, dropped: int) -> None:
        """What the child lost leaves the parent's written (it was counted there when the
        batch went into the pipe)."""
        if not (errors or dropped) or self._stats is None or self._stats_lock is None:
            return
        with self._stats_lock:
            self._stats.written -= errors + dropped
            self._stats.errors += errors
            self._stats.dropped += dropped

    def _update(self, written: int, errors: int, dropped: int) -> None:
        with self._lock:
            new_errors = errors - self._seen[1]
            new_dropped = dropped - self._seen[2]
            self._seen = (written, errors, dropped)
            self._moved_errors += new_errors
            self._moved_dropped += new_dropped
        self._move(new_errors, new_dropped)

    def _read(self) -> None:
        try:
            while (message := _receive(self._in)) is not None:
                kind = message[0]
                if kind == "stats":
                    self._update(*message[1:4])
                    self.pending = message[4]
                elif kind == "closed":
                    self._update(*message[1:4])
                    self._closed_counts = tuple(message[1:4])
                    self.pending = 0
                    break
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            log.warning("the %s output's process: unreadable report: %s", self.spec.name, exc)
        finally:
            self._done.set()
        if self._closed_counts is None:
            log.warning(
                "the %s output's process ended (exit status %s): the records it had not "
                "written, and those sent to it from now on, are lost (sink_dropped, "
                "sink_errors)",
                self.spec.name,
                self._process.wait(),
            )

    def write_batch(self, records: list[Record]) -> None:
        if self._done.is_set():
            raise ChildGoneError(f"the {self.spec.name} output's process has ended")
        try:
            _send(self._out, ("batch", records))
        except OSError as exc:  # EPIPE: the child is gone
            raise ChildGoneError(f"the {self.spec.name} output's process has ended: {exc}") from exc
        with self._lock:
            self.sent += len(records)

    def close(self) -> None:
        """The child writes its queue and closes its sink (bounded); what it never settled
        is counted dropped."""
        with contextlib.suppress(OSError):
            _send(self._out, ("close",))
        with contextlib.suppress(OSError):
            self._stdin.close()  # the end of file: a child that missed "close" ends too
        self._done.wait(self.spec.flush_s + _CLOSE_MARGIN_S)
        if self._process.poll() is None:
            try:
                self._process.wait(2.0)
            except subprocess.TimeoutExpired:
                log.warning(
                    "the %s output's process did not end at exit; it was killed",
                    self.spec.name,
                )
                self._kill()
        with self._lock:
            settled = sum(self._seen) if self._closed_counts is not None else None
            accounted = self._moved_errors + self._moved_dropped
            # Without the child's last report, what it had not written is lost.
            lost = self.sent - (self._seen[0] + accounted if settled is None else settled)
        if lost > 0:
            self._move(0, lost)
        with contextlib.suppress(OSError):
            self._in.close()

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            self._process.kill()
        self._process.wait()


def _rebuild(module: str, name: str, message: str) -> Exception:
    """The child's start error as the same class (StoreError, ValueError) when it can be:
    the command reports its message as if the sink had been built here."""
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
    except Exception as exc:  # any class that cannot be rebuilt is reported plainly
        log.debug("cannot rebuild %s.%s: %s", module, name, exc)
    return RuntimeError(message)


# The child's side.


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


class _Reporter:
    """Sends the child's counts when they change, at most every _STATS_S."""

    def __init__(self, fd: int, worker: SinkWorker) -> None:
        self._fd = fd
        self._worker = worker
        self._lock = threading.Lock()
        self._last: tuple[int, ...] = ()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowtap-child-stats", daemon=True)
        self._thread.start()

    def _counts(self) -> tuple[int, int, int]:
        """written, errors, dropped; written without what a sink still holds unsettled
        (otel: handed to the SDK, not yet exported), so that a child killed at exit has
        those counted as lost by the parent, not as written."""
        stats = self._worker.stats
        unsettled = getattr(self._worker.sink, "unsettled", None)
        held = unsettled() if callable(unsettled) else 0
        with self._worker._lock:
            return stats.written - held, stats.errors, stats.dropped

    def _run(self) -> None:
        while not self._stop.wait(_STATS_S):
            counts = (*self._counts(), self._worker.depth)
            if counts != self._last:
                self.send(("stats", *counts))
                self._last = counts

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock, contextlib.suppress(OSError):
            _send(self._fd, message)

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()
        self.send(("closed", *self._counts()))


def _drain(worker: SinkWorker, flush_s: float) -> None:
    """The pipeline's exit for one worker: its queue written within flush_s, else lost."""
    deadline = time.monotonic() + flush_s
    while worker.alive and time.monotonic() < deadline:
        worker.ask_stop()
        time.sleep(0.01)
    if worker.alive:
        worker.abandon()
        log.warning(
            "sink %s did not finish writing within %.0f s at exit; the records it had not "
            "written are counted as sink_dropped (lost): %d in all",
            worker.name,
            flush_s,
            worker.stats.dropped,
        )
        return
    try:
        worker.sink.close()
    except Exception as exc:
        log.error("the output %s was not closed cleanly: %s", worker.name, exc)


def child_main(parent: int) -> int:
    _die_with_parent(parent)
    # The parent ends us (its close, or our pipe's end): a Ctrl-C or a service manager's
    # SIGTERM to the whole group must not lose what is queued here before the parent asks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(_NICE)
    # The protocol has stdout's descriptor to itself: anything printed goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    stream = os.fdopen(0, "rb")
    spec = _receive(stream)
    if not isinstance(spec, SinkSpec):
        return 2
    logging.basicConfig(level=spec.log_level, format="flowtap: %(message)s", stream=sys.stderr)
    logging.getLogger("hpack").setLevel(logging.WARNING)
    try:
        sink = getattr(importlib.import_module(spec.module), spec.factory)(
            *spec.args, **spec.kwargs
        )
    except Exception as exc:
        cls = type(exc)
        _send(out, ("failed", cls.__module__, cls.__qualname__, str(exc)))
        return 1
    worker = SinkWorker(spec.name, sink, spec.capacity)
    reporter = _Reporter(out, worker)
    reporter.send(("ready",))
    while True:
        try:
            message = _receive(stream)
        except (OSError, pickle.UnpicklingError, EOFError, ValueError):
            message = None  # a cut frame: the parent is gone
        if message is None or message[0] == "close":
            break
        for record in message[1]:
            worker.offer(record)  # never blocks: a full queue is counted dropped
    _drain(worker, spec.flush_s)
    reporter.finish()
    return 0


def in_child(
    name: str,
    module: str,
    factory: str,
    *args: Any,
    capacity: int = DEFAULT_QUEUE,
    **kwargs: Any,
) -> ChildSink:
    """module.factory(*args, **kwargs) as a sink in its own process."""
    spec = SinkSpec(
        name,
        module,
        factory,
        args,
        kwargs,
        capacity=capacity,
        log_level=log.getEffectiveLevel(),
    )
    return ChildSink(spec)


if __name__ == "__main__":
    # Run through the imported module, not __main__: the parent pickles SinkSpec as
    # flowtap.sinks.child.SinkSpec.
    main = importlib.import_module("flowtap.sinks.child").child_main
    sys.exit(main(int(sys.argv[1])))
