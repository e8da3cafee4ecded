"""Opening the store's SQLite file safely, and its tables.

flowtap runs as root and may be told to keep its store in a directory others can write.
SQLite opens files by name (the database, its -wal and -shm files), so every one of them
is first created or checked through safefile (no symbolic link followed in such a
directory, no file of another user's, owner-only), and a directory others can write that
is not sticky is refused: there, another user could swap a file after the check."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from flowtap import safefile

SCHEMA_VERSION = 1
_COMPANIONS = ("", "-wal", "-shm")  # SQLite's files of one WAL database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS connections (
    id INTEGER PRIMARY KEY,
    run TEXT NOT NULL,           -- one sensor run: connection ids are unique within it
    ts REAL NOT NULL,            -- the record's time, seconds since the epoch
    connection_id INTEGER NOT NULL,
    event TEXT NOT NULL,         -- open | close
    pid INTEGER, comm TEXT, exe TEXT,
    direction TEXT,
    local_ip TEXT, local_port INTEGER, remote_ip TEXT, remote_port INTEGER,
    record TEXT NOT NULL         -- the record as JSON, as the json output writes it
);
CREATE INDEX IF NOT EXISTS connections_ts ON connections (ts);
CREATE INDEX IF NOT EXISTS connections_conn ON connections (run, connection_id);
CREATE TABLE IF NOT EXISTS http (
    id INTEGER PRIMARY KEY,
    run TEXT NOT NULL,
    ts REAL NOT NULL,
    connection_id INTEGER NOT NULL,
    pid INTEGER, comm TEXT, exe TEXT,
    method TEXT, url TEXT, host TEXT, path TEXT, status INTEGER,
    duration_ms REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS http_ts ON http (ts);
"""


class StoreError(Exception):
    """The store cannot be opened or read; the message says what to do."""


def _check_directory(path: Path) -> None:
    st = os.stat(path.parent)
    shared = st.st_mode & 0o022 or st.st_uid not in (0, os.geteuid())
    if shared and not st.st_mode & stat.S_ISVTX:
        raise StoreError(
            f"{path.parent} can be written by other users and is not sticky: they could "
            "replace the store's files after flowtap checked them; choose a directory only "
            "root can write (or a sticky one such as /tmp)"
        )


def _prepare(path: Path) -> None:
    """The database, -wal and -shm files: created owner-only, or checked to be ours."""
    _check_directory(path)
    for suffix in _COMPANIONS:
        name = Path(str(path) + suffix)
        fd = safefile.open_append(name)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"{name} is not a regular file; remove it or choose another path")
        finally:
            os.close(fd)


def connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """The store, in WAL mode (readers do not wait for the writer, nor it for them)."""
    path = Path(path)
    if not create:
        try:
            owner = os.stat(path).st_uid
        except FileNotFoundError:
            raise StoreError(
                f"{path}: no store there; start the sensor with --store {path} first"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read the store {path}: {exc}") from exc
        if owner != os.geteuid():
            raise StoreError(
                f"{path} belongs to uid {owner} and is owner-only (it holds what programs "
                "sent); run this command as that user (sudo)"
            )
    try:
        if create and not path.parent.exists():  # /var/lib/flowtap on a fresh host
            safefile.private_directory(path.parent, what="store's directory")
        _prepare(path)
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if create:
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open the store {path}: {exc}") from exc
    return db
