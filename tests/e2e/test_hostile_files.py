"""Files the sensor writes as root, in directories other users can write (issue 15, items
1, 12, 13): no link followed, no file of another user's taken over, a full disk survived
with exact counts, the ready file there only while the sensor is ready."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import STOP_TIMEOUT_S, TIMEOUT_SCALE, Lab, Sensor, flowtap_cli, wait_until

pytestmark = pytest.mark.e2e

NOBODY = 65534
SECRET = b"root's secret\n"


def _shared_dir(path: Path) -> Path:
    """A directory every user can write (no sticky bit: the kernel's protected_symlinks
    does not help here)."""
    path.mkdir()
    path.chmod(0o777)
    return path


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(SECRET)
    victim.chmod(0o600)
    return victim


def _assert_untouched(victim: Path) -> None:
    assert victim.read_bytes() == SECRET
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.stat().st_uid == 0


def _run(e2e: Lab, *extra: str) -> subprocess.CompletedProcess[str]:
    return flowtap_cli(
        "run", "--cgroup", str(e2e.cgroup.path), "--output", "json", *extra,
        timeout=30 * TIMEOUT_SCALE,
    )  # fmt: skip


def test_output_symlink_in_a_shared_directory_is_refused(e2e: Lab, tmp_path: Path) -> None:
    shared, victim = _shared_dir(tmp_path / "shared"), _victim(tmp_path)
    (shared / "records.jsonl").symlink_to(victim)
    result = _run(e2e, "--output-file", str(shared / "records.jsonl"))
    assert result.returncode == 2, result
    assert "symbolic link" in result.stderr and "Traceback" not in result.stderr, result.stderr
    _assert_untouched(victim)


def test_output_file_of_another_user_is_refused(e2e: Lab, tmp_path: Path) -> None:
    shared = _shared_dir(tmp_path / "shared")
    planted = shared / "records.jsonl"
    planted.write_bytes(b"")
    os.chown(planted, NOBODY, NOBODY)
    planted.chmod(0o644)
    result = _run(e2e, "--output-file", str(planted))
    assert result.returncode == 2, result
    assert "belongs to another user" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert planted.read_bytes() == b"" and planted.stat().st_uid == NOBODY


def test_output_hard_link_is_refused(e2e: Lab, tmp_path: Path) -> None:
    shared, victim = _shared_dir(tmp_path / "shared"), _victim(tmp_path)
    os.link(victim, shared / "records.jsonl")
    result = _run(e2e, "--output-file", str(shared / "records.jsonl"))
    assert result.returncode == 2, result
    assert "hard links" in result.stderr, result.stderr
    _assert_untouched(victim)


def test_stats_and_ready_links_are_not_followed(e2e: Lab, tmp_path: Path) -> None:
    """Links planted at the stats and ready files' names: the stats file replaces its
    link (the victim keeps its bytes and mode); the ready file is refused at start."""
    shared, victim = _shared_dir(tmp_path / "shared"), _victim(tmp_path)
    stats = shared / "stats.json"
    stats.symlink_to(victim)
    sensor = e2e.sensor(extra=["--stats-file", str(stats)])  # the last --stats-file wins
    os.kill(sensor.pid, signal.SIGINT)
    assert sensor.popen.wait(STOP_TIMEOUT_S) == 0, sensor.stderr()
    assert not stats.is_symlink()
    assert stat.S_IMODE(stats.stat().st_mode) == 0o600
    assert "drops" in json.loads(stats.read_text())
    _assert_untouched(victim)
    assert [p.name for p in shared.iterdir()] == ["stats.json"]  # no temporary left

    ready = shared / "ready"
    ready.symlink_to(victim)
    result = _run(e2e, "--ready-file", str(ready))
    assert result.returncode == 2, result
    assert str(ready) in result.stderr and "Traceback" not in result.stderr, result.stderr
    _assert_untouched(victim)


def test_ready_file_is_cleared_at_start_and_removed_at_exit(e2e: Lab, tmp_path: Path) -> None:
    workdir = tmp_path / "sensor"
    workdir.mkdir()
    # A stale file from an earlier run (kill -9) must not say "ready" for this one.
    (workdir / "ready").write_text("1\n")
    sensor = Sensor(workdir, ("--cgroup", str(e2e.cgroup.path)), ["--include-loopback"])
    e2e.sensors.append(sensor)
    seen: set[str] = set()

    def ready() -> bool:
        assert sensor.popen.poll() is None, sensor.stderr()
        try:
            text = sensor.ready.read_text().strip()
        except FileNotFoundError:
            text = "absent"
        seen.add(text)
        return text == str(sensor.pid)

    wait_until(ready, 20 * TIMEOUT_SCALE, "the ready file", interval=0.005)
    assert "absent" in seen, seen  # cleared before the programs were attached
    sensor.stop()
    assert not sensor.ready.exists()


@contextlib.contextmanager
def _small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at path, unmounted at the end whatever happens."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, timeout=30)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def test_full_disk_is_a_clean_exit_with_exact_counts(e2e: Lab, tmp_path: Path) -> None:
    connections = 80
    with _small_filesystem(tmp_path / "disk", "192k") as disk:
        server = e2e.server(connections=connections, cgroup=False)
        sensor = Sensor(disk, ("--cgroup", str(e2e.cgroup.path)), ["--include-loopback"])
        e2e.sensors.append(sensor)
        sensor.wait_ready()
        # Long command lines make big records: the filesystem fills after a few dozen.
        client = e2e.client(server, extra=["--repeat", str(connections), "--tag", "x" * 3000])
        client.finish()
        server.peer.finish()
        started = time.monotonic()
        os.kill(sensor.pid, signal.SIGINT)
        code = sensor.popen.wait(STOP_TIMEOUT_S)
        elapsed = time.monotonic() - started
        log = sensor.stderr()
        assert code == 0, log
        assert "Traceback" not in log, log
        stats = json.loads(sensor.stats_file.read_text())
        lines = sensor.output.read_bytes().split(b"\n")
        assert lines[-1] == b"", "a record was cut in the middle"
        written = [json.loads(line) for line in lines[:-1]]
    lost = stats["drops"]["sink_errors"]
    assert lost > 0, stats  # the disk did fill
    # records: what the consumer made; the file sink wrote some and failed the rest.
    assert stats["records"] == 2 * connections
    assert stats["sinks"]["file"] == {"written": len(written), "errors": lost, "dropped": 0}
    assert stats["sink_dropped"] == {"file": 0}
    # Every connection made two records: each is in the file or counted lost, once.
    assert len(written) + lost == 2 * connections, (len(written), lost)
    assert all(r["process"]["pid"] == client.pid for r in written)
    # One warning when it began, then at most one per 10 s with a count.
    assert log.count("could not write a record") == 1, log
    assert log.count("still cannot write records") <= 1 + elapsed / 10, log


def test_open_files_soft_limit_is_raised_to_the_hard_limit(e2e: Lab, tmp_path: Path) -> None:
    """Issue 15, item 2: a soft limit of 1,024 open files (a common default) ran out under
    2,000 connections; the sensor raises its own to the hard limit at start."""
    sensor = Sensor(tmp_path / "sensor", ("--cgroup", str(e2e.cgroup.path)), ["--include-loopback"])
    e2e.sensors.append(sensor)
    sensor.kill()  # started without the limit: start again under prlimit
    sensor.argv = ["prlimit", "--nofile=1024:8192", "--", *sensor.argv]
    with sensor.log.open("wb") as log:
        sensor.popen = subprocess.Popen(
            sensor.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    sensor.pid = sensor.popen.pid
    sensor.wait_ready()
    limits = Path(f"/proc/{sensor.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    assert line.split()[3:5] == ["8192", "8192"], line
    sensor.stop()
