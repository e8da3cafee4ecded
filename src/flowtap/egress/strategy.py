"""QPOINT_STRATEGY: Qtap's per-process strategy, as the kernel and as userspace read it.

New processes get theirs in the kernel at exec (bpf/sensor/environment.h), which knows the
bare values `forward` and `ignore` only; this fills the same table for the ones that exec'd
before, from /proc/PID/environ. Userspace reads Qtap's whole syntax (parse_strategy):
`observe`, `ignore`, `audit`, `forward`, `proxy`, optionally followed by executable filters,
`forward,exe.prefix:/usr/bin/python` (docs/egress.md: where the two views differ).
"""

from __future__ import annotations

import enum
import logging
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


StrategyName = Literal["observe", "ignore", "audit", "forward", "proxy"]
STRATEGY_NAMES: tuple[StrategyName, ...] = ("observe", "ignore", "audit", "forward", "proxy")
# Qtap's exe match strategies (tracking/exe_filters.py has the same five).
_MATCHES = ("exact", "prefix", "suffix", "contains", "regex")
_MAX_VALUE = 4096  # a longer QPOINT_STRATEGY is a mistake: observed, with a warning
_MAX_FILTERS = 16
_REGEX_SUBJECT = 4096  # an executable path longer than this is not matched by a regex


class StrategyError(ValueError):
    """A QPOINT_STRATEGY value that does not parse; the process is observed (as Qtap)."""


@dataclass(frozen=True, slots=True)
class ExeMatch:
    how: str  # one of _MATCHES
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, exe: str) -> bool:
        if self.how == "exact":
            return exe == self.value
        if self.how == "prefix":
            return exe.startswith(self.value)
        if self.how == "suffix":
            return exe.endswith(self.value)
        if self.how == "contains":
            return self.value in exe
        assert self.pattern is not None
        return self.pattern.search(exe[:_REGEX_SUBJECT]) is not None


@dataclass(frozen=True, slots=True)
class StrategySpec:
    """A parsed QPOINT_STRATEGY: the strategy, and the executables it is limited to
    (none: every executable). Any filter matching applies it (Qtap's QpointStrategyFromString)."""

    name: StrategyName = "observe"
    filters: tuple[ExeMatch, ...] = ()

    def for_exe(self, exe: str | None) -> StrategyName:
        """The strategy of a process running exe: observe when the filters leave it out."""
        if not self.filters:
            return self.name
        if exe and any(f.matches(exe) for f in self.filters):
            return self.name
        return "observe"


OBSERVE = StrategySpec()


def parse_strategy(text: str) -> StrategySpec:
    """Qtap's syntax: NAME[,exe.HOW:VALUE]... (`exe.` may be left out, as Qtap allows).
    Raises StrategyError with what is wrong; an empty value is observe."""
    if len(text) > _MAX_VALUE:
        raise StrategyError(f"{len(text)} bytes: at most {_MAX_VALUE}")
    name, _, rest = text.partition(",")
    name = name.strip()
    if name == "":
        name = "observe"
    if name not in STRATEGY_NAMES:
        raise StrategyError(f"{name!r} is not one of {', '.join(STRATEGY_NAMES)}")
    filters: list[ExeMatch] = []
    if rest:
        parts = rest.split(",")
        if len(parts) > _MAX_FILTERS:
            raise StrategyError(f"{len(parts)} filters: at most {_MAX_FILTERS}")
        for part in parts:
            filters.append(_exe_match(part))
    return StrategySpec(name, tuple(filters))


def _exe_match(text: str) -> ExeMatch:
    how, found, value = text.removeprefix("exe.").partition(":")
    if not found:
        raise StrategyError(f"{text!r}: a filter is exe.HOW:VALUE, as exe.prefix:/usr/bin/")
    if how not in _MATCHES:
        raise StrategyError(f"{text!r}: {how!r} is not one of {', '.join(_MATCHES)}")
    if not value:
        raise StrategyError(f"{text!r}: no executable to match")
    if how != "regex":
        return ExeMatch(how, value)
    # The rule language's guard: no nested repetition, no backreferences (rules/syntax.py).
    from flowtap.rules.syntax import RuleSyntaxError, compile_regex  # noqa: PLC0415

    try:
        return ExeMatch(how, value, compile_regex(value, 0, value))
    except RuleSyntaxError as error:
        raise StrategyError(f"{text!r}: {error.message}") from None


def strategy_value(environ: bytes) -> str | None:
    """The first QPOINT_STRATEGY entry's value, as the kernel reads it (None: absent)."""
    prefix = ENV_NAME + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode("utf-8", "replace")
    return None


def kernel_strategy(name: StrategyName) -> Strategy:
    """The kernel's three: proxy is forward in flowtap (one proxy does both), audit and
    observe are observe (audit is decided in userspace, per record)."""
    if name in ("forward", "proxy"):
        return Strategy.FORWARD
    if name == "ignore":
        return Strategy.IGNORE
    return Strategy.OBSERVE


def _processes(proc: Path) -> Iterator[tuple[int, bytes]]:
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield int(entry.name), (entry / "environ").read_bytes()
        except OSError:
            continue  # exited, or a kernel thread


def _userspace_strategy(pid: int, environ: bytes, proc: Path) -> Strategy:
    """Qtap's whole syntax, filters against /proc/PID/exe; a bad value observes."""
    value = strategy_value(environ)
    if value is None:
        return Strategy.OBSERVE
    try:
        spec = parse_strategy(value)
    except StrategyError as error:
        log.warning("pid %d: QPOINT_STRATEGY %s; observed", pid, error)
        return Strategy.OBSERVE
    try:
        exe: str | None = os.readlink(proc / str(pid) / "exe")
    except OSError:
        exe = None
    return kernel_strategy(spec.for_exe(exe))


def fill_running(
    strategies: BpfMap, ignore_in_use: BpfMap, proc: Path = Path("/proc")
) -> dict[Strategy, int]:
    """Writes the strategy of every running process that names one (the whole syntax:
    a running process's executable is known here); returns counts."""
    found = {Strategy.FORWARD: 0, Strategy.IGNORE: 0}
    for pid, environ in _processes(proc):
        if pid == os.getpid():
            continue
        strategy = _userspace_strategy(pid, environ, proc)
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
