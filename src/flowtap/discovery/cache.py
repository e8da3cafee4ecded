"""What each executable needs, by file identity, kept across restarts.

An identity is (device, inode, size, mtime): a copy of a file, a deploy over it or a
rewrite in place gives a new identity, so the new bytes are classified again. The cache
is written under --state-dir (owner-only, replaced atomically: safefile), so a restart
does not classify the host's executables again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flowtap import safefile

log = logging.getLogger("flowtap.discovery")

Verdict = Literal["nothing", "probe"]
CACHE_NAME = "exec-classes.json"
_FORMAT = 1
_MAX_ENTRIES = 200_000
_MAX_BYTES = 64 << 20


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def of_fd(cls, fd: int) -> Identity:
        return cls.of(os.fstat(fd))


@dataclass(frozen=True, slots=True)
class Entry:
    verdict: Verdict
    path: str  # as first seen (for restoring ignore marks at start, and for people)
    note: str = ""


class ClassCache:
    """Identity -> Entry. Used by one thread (the discovery worker), read by the gate's
    answering thread through lookup() only: a dict read is atomic under the GIL, and no
    lock is shared with the thread that answers held execs."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._entries: dict[Identity, Entry] = {}
        self.dirty = False

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, identity: Identity) -> Entry | None:
        return self._entries.get(identity)

    def record(self, identity: Identity, entry: Entry) -> None:
        if self._entries.get(identity) != entry and len(self._entries) < _MAX_ENTRIES:
            self._entries[identity] = entry
            self.dirty = True

    def forget(self, identity: Identity) -> None:
        """A deleted file: its identity never comes back, and must not fill the cache."""
        if self._entries.pop(identity, None) is not None:
            self.dirty = True

    def items(self) -> list[tuple[Identity, Entry]]:
        return list(self._entries.items())

    @property
    def path(self) -> Path | None:
        return None if self._directory is None else self._directory / CACHE_NAME

    def load(self) -> int:
        """Reads the cache file if there is a trustworthy one; returns the entries read.
        A file not owned by this user, writable by others, a symlink or malformed is
        ignored (logged): the worst a bad cache could do is skip a file's probes."""
        path = self.path
        if path is None:
            return 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("exec cache %s not read: %s", path, exc)
            return 0
        with os.fdopen(fd, "rb") as stream:
            st = os.fstat(stream.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_size > _MAX_BYTES:
                log.warning("exec cache %s ignored: not owned by us, or writable by others", path)
                return 0
            raw = stream.read(_MAX_BYTES)
        try:
            document = json.loads(raw)
            if document.get("format") != _FORMAT:
                return 0
            for row in document["files"][:_MAX_ENTRIES]:
                device, inode, size, mtime_ns, verdict, shown, note = row
                if verdict not in ("nothing", "probe"):
                    continue
                identity = Identity(int(device), int(inode), int(size), int(mtime_ns))
                self._entries[identity] = Entry(verdict, str(shown), str(note))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("exec cache %s ignored, malformed: %s", path, exc)
            self._entries.clear()
            return 0
        return len(self._entries)

    def save(self) -> None:
        """Writes the cache (owner-only), replacing the old file atomically."""
        path = self.path
        if path is None or not self.dirty:
            return
        rows = [
            [i.device, i.inode, i.size, i.mtime_ns, e.verdict, e.path, e.note]
            for i, e in sorted(self._entries.items())
        ]
        data = json.dumps({"format": _FORMAT, "files": rows}).encode()
        assert self._directory is not None
        safefile.private_directory(self._directory)
        safefile.replace(path, data, follow=False)  # a link there is replaced, not followed
        self.dirty = False
