"""The store's SQLite sink with real files: retention deletes exactly the oldest rows, a
batch is all or nothing, and the file is created under safefile's rules."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from flowtap.store.db import StoreError, connect
from flowtap.store.sink import StoreSink

T0 = 1_800_000_000.0


def _record(n: int, ts: float) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "type": "connection",
        "event": "open",
        "connection_id": n,
        "timestamp": stamp,
        "direction": "egress",
        "process": {
            "pid": 1000 + n,
            "comm": "curl",
            "exe": "/usr/bin/curl",
            "cmdline": ["x" * 200],
        },
        "local": {"ip": "127.0.0.1", "port": 40000},
        "remote": {"ip": "127.0.0.1", "port": 80},
    }


def _ids(path: Path) -> list[int]:
    db = connect(path, create=False)
    try:
        return [row[0] for row in db.execute("SELECT connection_id FROM connections ORDER BY id")]
    finally:
        db.close()


def test_age_retention_deletes_exactly_the_older_rows(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    sink = StoreSink(path, max_age_s=50.0, clock=lambda: T0 + 100.0)
    sink.write_batch([_record(n, T0 + n) for n in range(100)])
    sink.apply_retention()
    sink.close()
    # Older than 50 s at T0 + 100: the rows of T0 + 0 .. T0 + 49.
    assert _ids(path) == list(range(50, 100))
    assert sink.deleted == 50


def test_size_retention_deletes_the_oldest_rows_first(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    limit = 256 << 10
    sink = StoreSink(path, max_bytes=limit)
    for start in range(0, 3000, 500):
        sink.write_batch([_record(n, T0 + n) for n in range(start, start + 500)])
    sink.apply_retention()
    used = sink.used_bytes()
    sink.close()
    kept = _ids(path)
    assert 0 < len(kept) < 3000
    assert kept == list(range(3000 - len(kept), 3000))  # the newest, none missing
    assert used <= limit
    assert sink.deleted == 3000 - len(kept)


def test_a_failed_batch_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    sink = StoreSink(path)
    broken = _record(2, T0)
    del broken["connection_id"]
    with pytest.raises(KeyError):
        sink.write_batch([_record(1, T0), broken])
    sink.write_batch([_record(3, T0)])
    sink.close()
    assert _ids(path) == [3]


def test_store_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    StoreSink(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_missing_directory_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "flowtap.db"
    StoreSink(path).close()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_a_symlink_in_a_shared_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = tmp_path / "victim"
    target.write_text("keep me")
    (shared / "store.db").symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        StoreSink(shared / "store.db")
    assert target.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_companion_file_of_another_user_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / "store.db-wal"
    planted.write_bytes(b"")
    os.chown(planted, 65534, 65534)
    with pytest.raises(StoreError, match="another user"):
        StoreSink(shared / "store.db")


def test_a_shared_directory_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StoreError, match="not sticky"):
        StoreSink(shared / "store.db")
    assert not (shared / "store.db").exists()


def test_query_of_a_store_of_another_user_says_whose_it_is(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    path = tmp_path / "store.db"
    StoreSink(path).close()
    os.chown(path, 65534, 65534)
    with pytest.raises(StoreError, match="belongs to uid 65534 and is owner-only"):
        connect(path, create=False)
    with pytest.raises(StoreError, match="no store there"):
        connect(tmp_path / "absent.db", create=False)
