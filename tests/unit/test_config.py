"""SensorConfig.validate and the command-line parser (nothing is started)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from flowtap import __version__, config
from flowtap.cli import build_parser, config_from_args, main
from flowtap.config import ConfigError, SensorConfig

PAGE = os.sysconf("SC_PAGE_SIZE")
# Above the largest pid_max Linux allows (2^22), so never a running process.
NO_SUCH_PID = (1 << 22) + 1


@pytest.fixture
def cgroup_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in cgroup v2 mount point, as cgroup2_mount() reports it."""
    root = tmp_path / "cgroup"
    (root / "system.slice" / "nginx.service").mkdir(parents=True)
    monkeypatch.setattr(config, "cgroup2_mount", lambda: root)
    return root


def test_defaults_are_valid() -> None:
    SensorConfig().validate()


def test_running_pid_is_valid() -> None:
    SensorConfig(pids=(os.getpid(),)).validate()


@pytest.mark.parametrize("pid", [0, -1, -4242])
def test_pid_must_be_positive(pid: int) -> None:
    with pytest.raises(ConfigError, match=rf"^--pid {pid}: a process id is a positive number$"):
        SensorConfig(pids=(pid,)).validate()


def test_pid_must_exist() -> None:
    with pytest.raises(ConfigError) as caught:
        SensorConfig(pids=(os.getpid(), NO_SUCH_PID)).validate()

    message = str(caught.value)
    assert message.startswith(f"--pid {NO_SUCH_PID}: no such process")
    assert f"ps -p {NO_SUCH_PID}" in message


def test_pid_of_a_thread_is_rejected() -> None:
    started = threading.Event()
    release = threading.Event()
    tids: list[int] = []

    def worker() -> None:
        tids.append(threading.get_native_id())
        started.set()
        release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        started.wait(10)
        assert tids[0] != os.getpid()
        with pytest.raises(ConfigError, match=f"--pid {tids[0]}"):
            SensorConfig(pids=(tids[0],)).validate()
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize("inside", ["", "system.slice", "system.slice/nginx.service"])
def test_cgroup_inside_the_mount(cgroup_root: Path, inside: str) -> None:
    SensorConfig(cgroup=cgroup_root / inside).validate()


def test_cgroup_outside_the_mount(cgroup_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    with pytest.raises(ConfigError) as caught:
        SensorConfig(cgroup=outside).validate()

    message = str(caught.value)
    assert message.startswith(f"--cgroup {outside}: not inside the cgroup v2 hierarchy")
    assert str(cgroup_root) in message


def test_cgroup_symlink_that_leads_outside(cgroup_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = cgroup_root / "link"
    link.symlink_to(outside)

    with pytest.raises(ConfigError, match=re.escape(f"--cgroup {link}: not inside")):
        SensorConfig(cgroup=link).validate()


def test_cgroup_parent_of_the_mount(cgroup_root: Path) -> None:
    with pytest.raises(ConfigError, match="not inside the cgroup v2 hierarchy"):
        SensorConfig(cgroup=cgroup_root.parent).validate()


def test_cgroup_that_does_not_exist(cgroup_root: Path) -> None:
    missing = cgroup_root / "no.slice"

    with pytest.raises(ConfigError, match=re.escape(f"--cgroup {missing}: not a directory")):
        SensorConfig(cgroup=missing).validate()


def test_cgroup_that_is_a_file(cgroup_root: Path) -> None:
    control = cgroup_root / "cgroup.procs"
    control.write_text("1\n")

    with pytest.raises(ConfigError, match=re.escape(f"--cgroup {control}: not a directory")):
        SensorConfig(cgroup=control).validate()


def test_cgroup_without_cgroup2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "cgroup2_mount", lambda: None)

    with pytest.raises(ConfigError, match="needs cgroup v2"):
        SensorConfig(cgroup=tmp_path).validate()


@pytest.mark.parametrize(
    "size", [PAGE * 3, PAGE + 1, (8 << 20) - 1, (8 << 20) + PAGE, 0, -PAGE, PAGE // 2]
)
def test_ring_buffer_size_must_be_a_power_of_two_of_pages(size: int) -> None:
    with pytest.raises(ConfigError) as caught:
        SensorConfig(ring_buffer_bytes=size).validate()

    assert str(caught.value) == (
        f"ring buffer size {size}: must be a power of two of at least {PAGE} bytes"
    )


@pytest.mark.parametrize("size", [PAGE, PAGE * 2, 1 << 20, 8 << 20, 1 << 30])
def test_ring_buffer_sizes_that_work(size: int) -> None:
    SensorConfig(ring_buffer_bytes=size).validate()


@pytest.mark.parametrize("count", [0, -1, (1 << 22) + 1])
def test_max_connections_range(count: int) -> None:
    with pytest.raises(ConfigError, match=rf"^max connections {count}: use 1 to 4194304$"):
        SensorConfig(max_connections=count).validate()


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_stats_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ConfigError, match="stats interval must be positive"):
        SensorConfig(stats_interval_s=interval).validate()


# --- command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["run", "--bogus"],
        ["check", "--pid", "1"],
        ["fly"],
        ["run", "--pid"],
        ["run", "--pid", "0"],
        ["run", "--pid", "-3"],
        ["run", "--pid", "abc"],
        ["run", "--direction", "sideways"],
        ["run", "--output", "xml"],
        ["run", "--color", "sometimes"],
        ["run", "--stats-interval", "soon"],
    ],
)
def test_parser_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)

    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_pid_errors_name_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    for value, message in [("0", "0 must be positive"), ("x1", "'x1' is not a whole number")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", "--pid", value])
        assert message in capsys.readouterr().err


def test_run_defaults() -> None:
    args = build_parser().parse_args(["run"])

    assert args.command == "run"
    assert args.pid == []
    assert args.exe == []
    assert args.cgroup is None
    assert args.direction == "all"
    assert args.include_loopback is False
    assert args.output == "console"
    assert args.output_file is None
    assert args.stats_interval == 30.0
    assert args.color == "auto"
    assert args.verbose is False
    assert config_from_args(args) == SensorConfig()


def test_run_options_make_the_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "run",
            "--pid",
            "1",
            "--pid",
            "42",
            "--cgroup",
            "/sys/fs/cgroup/system.slice",
            "--exe",
            "curl",
            "--exe",
            "*/python3*",
            "--direction",
            "egress",
            "--include-loopback",
            "--output",
            "json",
            "--output-file",
            str(tmp_path / "out.jsonl"),
            "--ready-file",
            str(tmp_path / "ready"),
            "--stats-file",
            str(tmp_path / "stats.json"),
            "--stats-interval",
            "2.5",
            "-v",
        ]
    )

    assert config_from_args(args) == SensorConfig(
        pids=(1, 42),
        cgroup=Path("/sys/fs/cgroup/system.slice"),
        exe_patterns=("curl", "*/python3*"),
        direction="egress",
        include_loopback=True,
        output="json",
        output_file=tmp_path / "out.jsonl",
        ready_file=tmp_path / "ready",
        stats_file=tmp_path / "stats.json",
        stats_interval_s=2.5,
    )
    assert args.verbose is True


def test_check_command() -> None:
    args = build_parser().parse_args(["check", "--color", "never"])

    assert args.command == "check"
    assert args.color == "never"


def test_main_defaults_to_run(capsys: pytest.CaptureFixture[str]) -> None:
    """`flowtap --pid x` is `flowtap run --pid x`: the run parser reports the error."""
    with pytest.raises(SystemExit) as caught:
        main(["--pid", "x"])

    assert caught.value.code == 2
    assert (
        "flowtap run: error: argument --pid: 'x' is not a whole number" in capsys.readouterr().err
    )


def test_main_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--bogus"])

    assert caught.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])

    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"flowtap {__version__}"


def test_main_help_is_the_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])

    assert caught.value.code == 0
    assert "{run,check,validate,reload-config,query,export}" in capsys.readouterr().out


def test_tls_attach_is_per_file_unless_asked() -> None:
    assert SensorConfig().tls_attach_mode == "file"
    assert SensorConfig(pids=(os.getpid(),)).tls_attach_mode == "file"
    assert SensorConfig(pids=(os.getpid(),), tls_attach="process").tls_attach_mode == "process"


def test_tls_attach_process_needs_a_pid() -> None:
    with pytest.raises(ConfigError, match="give --pid, or use --tls-attach file"):
        SensorConfig(tls_attach="process").validate()
    SensorConfig(pids=(os.getpid(),), tls_attach="process").validate()


def test_egress_options_make_the_config(
    cgroup_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRUST_STORE", str(tmp_path / "from-env"))
    argv = ["run", "--egress", "--egress-cgroup", str(cgroup_root), "--proxy-port", "3128"]
    argv += ["--state-dir", str(tmp_path / "state")]
    made = config_from_args(build_parser().parse_args(argv))

    assert made.egress
    assert made.egress_cgroup == cgroup_root
    assert made.trust_store == tmp_path / "from-env"  # TRUST_STORE, as in the seed
    assert made.proxy_port == 3128
    assert made.egress_state_dir == tmp_path / "state"
    made.validate()


def test_egress_settings_need_egress(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need --egress"):
        SensorConfig(trust_store=tmp_path).validate()


def test_egress_cgroup_outside_the_mount(cgroup_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^--egress-cgroup {tmp_path}: not inside"):
        SensorConfig(egress=True, egress_cgroup=tmp_path).validate()


@pytest.mark.parametrize("port", [-1, 65536])
def test_proxy_port_range(cgroup_root: Path, port: int) -> None:
    with pytest.raises(ConfigError, match=f"--proxy-port {port}"):
        SensorConfig(egress=True, proxy_port=port).validate()


def test_trust_store_that_is_a_file(cgroup_root: Path, tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(ConfigError, match=r"--trust-store .*: not a directory"):
        SensorConfig(egress=True, trust_store=afile).validate()
