"""`flowtap reload-config` signals only a running flowtap, found through a trusted pid file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowtap.settings import reload


def test_a_process_that_is_not_flowtap_is_never_signalled() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert reload.is_sensor(sleeper.pid) is False
        with pytest.raises(ValueError, match=f"process {sleeper.pid} is not a running flowtap"):
            reload.signal_reload(sleeper.pid)
        assert sleeper.poll() is None  # still running: no SIGHUP reached it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_flowtap_command_line_is_recognised() -> None:
    # A process whose argv[0] is "flowtap" (bash's exec -a), as the installed script's is.
    shell = subprocess.Popen(["bash", "-c", "exec -a flowtap sleep 30"])
    try:
        for _ in range(200):  # until bash has exec'd (bounded: 2 s)
            if Path(f"/proc/{shell.pid}/cmdline").read_bytes().startswith(b"flowtap\0"):
                break
            time.sleep(0.01)
        assert reload.is_sensor(shell.pid) is True
    finally:
        shell.kill()
        shell.wait()


def test_pid_file_missing_or_not_ours_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist: no sensor runs with --state-dir"):
        reload.sensor_pid(tmp_path)
    pid_file = tmp_path / reload.PID_FILE
    pid_file.write_text("not a pid\n")
    with pytest.raises(ValueError, match="does not hold a pid"):
        reload.sensor_pid(tmp_path)
    pid_file.write_text(f"{os.getpid()}\n")
    assert reload.sensor_pid(tmp_path) == os.getpid()
    os.chown(pid_file, 65534, 65534)  # another user's file: it could name any process
    with pytest.raises(ValueError, match="is not owned by this user: not trusted"):
        reload.sensor_pid(tmp_path)
