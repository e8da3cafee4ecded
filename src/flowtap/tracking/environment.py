"""What a process's environment says to flowtap: QPOINT_STRATEGY (egress/strategy.py) and its
tags, from QPOINT_TAGS and from the configuration's `tags` (Qtap's `source: env`).

Read once per process from /proc/PID/environ. Only the variables named here are kept, never
the rest of the environment (it holds secrets); tags are labels the user chose to attach.
Qtap's format: QPOINT_TAGS="team:payments,env:prod", each tag KEY:VALUE, both lowercased,
trimmed to start and end with a letter or digit, spaces as hyphens (pkg/tags in Qtap).
A record carries them as Qtap's events do: {"env": ["prod"], "team": ["payments"]}.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flowtap.egress.strategy import (
    ENV_NAME,
    OBSERVE,
    StrategyError,
    StrategyName,
    StrategySpec,
    parse_strategy,
)

log = logging.getLogger("flowtap")

TAGS_NAME = "QPOINT_TAGS"
MAX_TAGS_VALUE = 4096  # bytes of QPOINT_TAGS; a longer value is ignored whole
MAX_TAGS = 32  # tags a process gets; the rest are dropped
_MAX_ENVIRON = 1 << 20  # bytes of /proc/PID/environ read (the kernel allows a few MiB)

Tags = tuple[tuple[str, tuple[str, ...]], ...]  # sorted (key, values) pairs


@dataclass(frozen=True, slots=True)
class EnvTag:
    """The configuration's `tags[]` entry with `source: env`: the tag `key` takes the value
    of the process's environment variable `location`."""

    key: str
    location: str


@dataclass(slots=True)
class EnvironmentStats:
    bad_tags: int = 0  # tags or QPOINT_TAGS values ignored (warned)
    bad_strategies: int = 0  # QPOINT_STRATEGY values that did not parse (observed)
    unreadable: int = 0  # processes whose environment could not be read


def normalize(text: str) -> str:
    """Qtap's tag format(): lowercase, letters or digits at both ends, spaces as hyphens."""
    lowered = text.lower()
    start, end = 0, len(lowered)
    while start < end and not _alnum(lowered[start]):
        start += 1
    while end > start and not _alnum(lowered[end - 1]):
        end -= 1
    return lowered[start:end].replace(" ", "-")


def _alnum(char: str) -> bool:
    return ("a" <= char <= "z") or ("0" <= char <= "9")


def parse_tags(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """(key -> values, what was wrong). Bad entries are skipped one by one; a value over
    MAX_TAGS_VALUE is refused whole; past MAX_TAGS tags the rest are dropped."""
    problems: list[str] = []
    tags: dict[str, list[str]] = {}
    if len(text.encode()) > MAX_TAGS_VALUE:
        return tags, [f"{TAGS_NAME} is over {MAX_TAGS_VALUE} bytes"]
    count = 0
    for entry in text.split(","):
        if not entry.strip():
            continue
        key, found, value = entry.partition(":")
        key, value = normalize(key), normalize(value)
        if not found or not key or not value:
            problems.append(f"{TAGS_NAME} entry {entry.strip()[:64]!r} is not KEY:VALUE")
            continue
        if count >= MAX_TAGS:
            problems.append(f"{TAGS_NAME} has more than {MAX_TAGS} tags")
            break
        values = tags.setdefault(key, [])
        if value not in values:
            values.append(value)
            count += 1
    return tags, problems


@dataclass(frozen=True)
class EnvironmentReader:
    """Which variables to read: QPOINT_STRATEGY, QPOINT_TAGS and the configuration's env
    tags. Shared by the registry's threads; keeps no per-process state."""

    env_tags: Sequence[EnvTag] = ()
    stats: EnvironmentStats = field(default_factory=EnvironmentStats, compare=False)

    def read(self, pid: int, proc: Path = Path("/proc")) -> tuple[Tags, StrategySpec]:
        """The process's tags and strategy; ((), observe) when its environment is gone."""
        try:
            with (proc / str(pid) / "environ").open("rb") as file:
                raw = file.read(_MAX_ENVIRON)
        except OSError:
            self.stats.unreadable += 1
            return (), OBSERVE
        return self.from_environ(raw, pid)

    def from_environ(self, raw: bytes, pid: int = 0) -> tuple[Tags, StrategySpec]:
        wanted = {TAGS_NAME, ENV_NAME.decode(), *(tag.location for tag in self.env_tags)}
        found: dict[str, str] = {}
        for entry in raw.split(b"\0"):
            name, sep, value = entry.partition(b"=")
            if not sep:
                continue
            text = name.decode("utf-8", "replace")
            if text in wanted and text not in found:  # the first one, as the kernel reads
                found[text] = value.decode("utf-8", "replace")
        return self._tags(found, pid), self._strategy(found, pid)

    def _tags(self, found: Mapping[str, str], pid: int) -> Tags:
        tags: dict[str, list[str]] = {}
        if TAGS_NAME in found:
            tags, problems = parse_tags(found[TAGS_NAME])
            for problem in problems:
                self.stats.bad_tags += 1
                log.warning("pid %d: %s; ignored", pid, problem)
        for env_tag in self.env_tags:
            value = normalize(found.get(env_tag.location, "")[:MAX_TAGS_VALUE])
            if not value:
                continue
            values = tags.setdefault(env_tag.key, [])
            if value not in values and sum(len(v) for v in tags.values()) < MAX_TAGS:
                values.append(value)
        return tuple((key, tuple(values)) for key, values in sorted(tags.items()) if values)

    def _strategy(self, found: Mapping[str, str], pid: int) -> StrategySpec:
        value = found.get(ENV_NAME.decode())
        if value is None:
            return OBSERVE
        try:
            return parse_strategy(value)
        except StrategyError as error:
            self.stats.bad_strategies += 1
            log.warning("pid %d: QPOINT_STRATEGY %s; the process is observed", pid, error)
            return OBSERVE


def tags_record(tags: Tags) -> dict[str, list[str]]:
    """The records' `tags`: key -> values, keys sorted."""
    return {key: list(values) for key, values in tags}


def strategy_of(spec: StrategySpec, exe: str | None) -> StrategyName:
    return spec.for_exe(exe)
