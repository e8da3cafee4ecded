"""The command line: errors that must be clear, and `flowtap check` on this host."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import Lab, flowtap_cli

pytestmark = pytest.mark.e2e

NOBODY = 65534
NO_SUCH_PID = 999_999_999  # above any pid_max (at most 2**22)


def test_unprivileged_run_is_refused(e2e: Lab) -> None:
    sleeper = e2e.spawn(["/bin/sleep", "30"], cgroup=e2e.cgroup, stem="sleep")
    result = flowtap_cli("run", "--pid", str(sleeper.pid), "--include-loopback", user=NOBODY)
    assert result.returncode == 2, result
    assert "needs root" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_is_a_usage_error(e2e: Lab) -> None:
    result = flowtap_cli("run", "--cgroup", str(e2e.cgroup.path), "--no-such-flag")
    assert result.returncode == 2, result
    assert "usage:" in result.stderr
    assert "--no-such-flag" in result.stderr


def test_missing_pid_is_named() -> None:
    result = flowtap_cli("run", "--pid", str(NO_SUCH_PID))
    assert result.returncode == 2, result
    assert str(NO_SUCH_PID) in result.stderr
    assert "Traceback" not in result.stderr


def test_cgroup_outside_the_hierarchy_is_refused(tmp_path: Path) -> None:
    result = flowtap_cli("run", "--cgroup", str(tmp_path))
    assert result.returncode == 2, result
    assert str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_this_host() -> None:
    result = flowtap_cli("check", "--color", "never")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    fentry = [line for line in lines if " fentry " in f" {line} "]
    kprobes = [line for line in lines if " kprobes " in f" {line} "]
    assert len(fentry) == 1, result.stdout
    assert len(kprobes) == 1, result.stdout
    assert "refused by the kernel (EPERM)" in fentry[0]
    assert "not compiled in" in kprobes[0]
