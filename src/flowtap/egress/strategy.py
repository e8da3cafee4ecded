"""QPOINT_STRATEGY of processes already running when the sensor starts.

New processes get theirs in the kernel at exec (bpf/sensor/environment.h); this fills the same
table for the ones that exec'd before, from /proc/PID/environ.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from flowtap.loader.libbpf import BpfMap

log = logging.getLogger("flowtap.egress")

ENV_NAME = b"QPOINT_STRATEGY"


class Strategy(enum.IntEnum):
    """Values of enum ft_strategy (bpf/flowtap.h), checked against BTF at load."""

    OBSERVE = 0
    FORWARD = 1
    IGNORE = 2


_BY_VALUE = {b"forward": Strategy.FORWARD, b"ignore": Strategy.IGNORE}


def strategy_of_environment(environ: bytes) -> Strategy:
    """The strategy an environment block (NUL-separated NAME=value) asks for. The kernel
    reads the first QPOINT_STRATEGY entry, so this does too; unknown values observe."""
    prefix = ENV_NAME + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return _BY_VALUE.get(entry[len(prefix) :], Strategy.OBSERVE)
    return Strategy.OBSERVE


def _processes(proc: Path) -> Iterator[tuple[int, bytes]]:
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield int(entry.name), (entry / "environ").read_bytes()
        except OSError:
            continue  # exited, or a kernel thread


def fill_running(
    strategies: BpfMap, ignore_in_use: BpfMap, proc: Path = Path("/proc")
) -> dict[Strategy, int]:
    """Writes the strategy of every running process that names one; returns counts."""
    found = {Strategy.FORWARD: 0, Strategy.IGNORE: 0}
    for pid, environ in _processes(proc):
        if pid == os.getpid():
            continue
        strategy = strategy_of_environment(environ)
        if strategy is Strategy.OBSERVE:
            continue
        strategies.update(struct.pack("<I", pid), struct.pack("<B", strategy))
        found[strategy] += 1
    if found[Strategy.IGNORE]:
        ignore_in_use.update(struct.pack("<I", 0), struct.pack("<I", 1))
    log.info(
        "QPOINT_STRATEGY of running processes: %d forward, %d ignore",
        found[Strategy.FORWARD],
        found[Strategy.IGNORE],
    )
    return found
