"""Reloading the configuration file of a running sensor: on SIGHUP and when the file changes.

The file is read again through the same path as at start (defaults < file < environment <
flags), so a flag given at start still wins after a reload. A file that does not load keeps
the previous configuration, and the log says why.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("flowtap")

CHECK_INTERVAL_S = 1.0  # how often the file's identity is looked at
PID_FILE = "sensor.pid"  # in the state directory: what `flowtap reload-config` signals

T = TypeVar("T")


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ConfigWatcher(Generic[T]):
    """Tells the event loop when to load the file again; `load` raises on a bad file."""

    def __init__(self, path: Path, load: Callable[[], T]) -> None:
        self.path = path
        self._load = load
        self._requested = threading.Event()
        self._seen = _identity(path)
        self._next_check = time.monotonic() + CHECK_INTERVAL_S
        self.refused = 0  # reloads of a file that did not load

    def request(self) -> None:
        """From the SIGHUP handler: only sets a flag, the loop does the work."""
        self._requested.set()

    def poll(self) -> T | None:
        """The new configuration when a reload is due and the file loads, else None."""
        now = time.monotonic()
        requested = self._requested.is_set()
        if not requested and now < self._next_check:
            return None
        self._next_check = now + CHECK_INTERVAL_S
        identity = _identity(self.path)
        if not requested and identity == self._seen:
            return None
        self._requested.clear()
        self._seen = identity
        why = "SIGHUP" if requested else "the file changed"
        try:
            config = self._load()
        except Exception as exc:  # any error in the file: keep what runs
            self.refused += 1
            log.warning(
                "configuration %s not reloaded (%s): %s; the previous configuration stays",
                self.path,
                why,
                exc,
            )
            return None
        log.info("configuration %s reloaded (%s)", self.path, why)
        return config


def is_sensor(pid: int) -> bool:
    """Whether pid runs flowtap (so that a stale or planted pid is never signalled)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if len(argv) < 2:
        return False
    # `flowtap ...` (the script: the interpreter, then its path) or `python -m flowtap ...`
    names = {os.path.basename(argv[0]), os.path.basename(argv[1])}
    return b"flowtap" in names or argv[1:3] == [b"-m", b"flowtap"]


def sensor_pid(state_dir: Path) -> int:
    """The pid the running sensor wrote in its state directory; ValueError says why not."""
    path = state_dir / PID_FILE
    try:
        st = os.lstat(path)
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist: no sensor runs with --state-dir {state_dir} "
            "(or give its --pid)"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if st.st_uid != os.geteuid():
        raise ValueError(f"{path} is not owned by this user: not trusted")
    if not text.strip().isdigit():
        raise ValueError(f"{path} does not hold a pid")
    return int(text)


def signal_reload(pid: int) -> None:
    """SIGHUP to a running sensor; ValueError when pid is not one."""
    if not is_sensor(pid):
        raise ValueError(f"process {pid} is not a running flowtap")
    os.kill(pid, signal.SIGHUP)
