"""The one declaration of every setting: flags derived from it, and precedence
defaults < environment < flags actually given (nothing is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowtap.cli import build_parser, config_from_args, main
from flowtap.config import ConfigError, SensorConfig
from flowtap.settings.options import OPTIONS, SettingError
from flowtap.settings.qtap import FILE_ONLY
from flowtap.settings.resolve import resolve


def _given(argv: list[str]) -> object:
    args = build_parser(given_only=True).parse_args(["run", *argv])
    args._given_only = True
    return args


def test_every_config_field_is_declared_once() -> None:
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    declared = {option.name for option in OPTIONS if option.in_config}
    assert declared == set(SensorConfig.__dataclass_fields__) - {"origins", *FILE_ONLY}


def test_defaults_are_the_config_defaults() -> None:
    assert config_from_args(_given([]), environ={}) == SensorConfig()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("env", "argv", "expected", "origin"),
    [
        ({}, [], 64 << 10, None),
        ({"FLOWTAP_MAX_BODY_BYTES": "100"}, [], 100, "$FLOWTAP_MAX_BODY_BYTES"),
        ({"FLOWTAP_MAX_BODY_BYTES": "100"}, ["--max-body-bytes", "7"], 7, "--max-body-bytes"),
        # A flag given with the default's value still wins over the environment.
        (
            {"FLOWTAP_MAX_BODY_BYTES": "100"},
            ["--max-body-bytes", "65536"],
            65536,
            "--max-body-bytes",
        ),
    ],
)
def test_precedence(env: dict[str, str], argv: list[str], expected: int, origin: str) -> None:
    values, origins = resolve(_given(argv), env)  # type: ignore[arg-type]
    assert values["max_body_bytes"] == expected
    assert origins.get("max_body_bytes") == origin


def test_environment_of_each_kind() -> None:
    env = {
        "FLOWTAP_PIDS": "1, 42",
        "FLOWTAP_EXE_PATTERNS": "curl,*/python3*",
        "FLOWTAP_INCLUDE_LOOPBACK": "yes",
        "FLOWTAP_REDACT": "false",
        "FLOWTAP_EXEC_GATE": "off",
        "QPOINT_TLS_PROBES": "openssl",
        "FLOWTAP_STATE_DIR": "/tmp/x",
        "FLOWTAP_CAPTURE_LEVEL": "full",
    }
    config = config_from_args(_given([]), environ=env)  # type: ignore[arg-type]
    assert config == SensorConfig(
        pids=(1, 42),
        exe_patterns=("curl", "*/python3*"),
        include_loopback=True,
        redact=False,
        exec_gate=False,
        tls_probes=("openssl",),
        egress_state_dir=Path("/tmp/x"),
        capture_level="full",
    )
    # The flag beats the variable, also for a negated flag and an on/off flag.
    flags = ["--exec-gate", "on", "--capture-level", "none", "--no-redaction"]
    config = config_from_args(_given(flags), environ={"FLOWTAP_REDACT": "true", **env})  # type: ignore[arg-type]
    assert (config.exec_gate, config.capture_level, config.redact) == (True, "none", False)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLOWTAP_DIRECTION": "egres"}, "$FLOWTAP_DIRECTION: 'egres' is not one of egress"),
        ({"FLOWTAP_PIDS": "1,x"}, "$FLOWTAP_PIDS: 'x' is not a whole number"),
        ({"FLOWTAP_EXEC_HOLD_MS": "0"}, "$FLOWTAP_EXEC_HOLD_MS: 0 must be positive"),
        ({"FLOWTAP_STATS_INTERVAL": "nan"}, "$FLOWTAP_STATS_INTERVAL: 'nan' is not a finite"),
        ({"FLOWTAP_EGRESS": "maybe"}, "$FLOWTAP_EGRESS: 'maybe' is not one of true"),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingError) as caught:
        resolve(_given([]), env)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)


def test_main_reports_a_bad_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLOWTAP_DIRECTION", "sideways")
    assert main(["run"]) == 2
    assert "flowtap: $FLOWTAP_DIRECTION: 'sideways' is not one of egress, ingress, all" in (
        capsys.readouterr().err
    )


def test_every_flag_still_parses() -> None:
    """The flags of before the declaration, with their meaning."""
    args = build_parser().parse_args(
        [
            "run",
            "--tls-attach",
            "process",
            "--exec-gate",
            "off",
            "--state-dir",
            "/s",
            "--proxy-header-timeout",
            "3",
            "--stats-interval",
            "2",
            "--avoid-kernel-features",
            "",
        ]
    )
    config = config_from_args(args, environ={})
    assert (config.tls_attach, config.exec_gate, config.egress_state_dir) == (
        "process",
        False,
        Path("/s"),
    )
    assert (config.proxy_header_timeout_s, config.stats_interval_s) == (3.0, 2.0)


# --- the YAML file ---------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flowtap.yaml"
    path.write_text(text)
    return path


def test_yaml_between_defaults_and_environment(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "flowtap:\n  max_body_bytes: 100\n  direction: egress\n  exe_patterns: [curl]\n",
    )
    values, origins = resolve(_given(["--config", str(path)]), {})  # type: ignore[arg-type]
    assert (values["max_body_bytes"], values["direction"]) == (100, "egress")
    assert values["exe_patterns"] == ("curl",)
    assert origins["direction"] == f"{path}:3: flowtap.direction"
    # environment over the file, flags over both; QPOINT_CONFIG names the file too
    env = {"QPOINT_CONFIG": str(path), "FLOWTAP_MAX_BODY_BYTES": "5"}
    values, _ = resolve(_given(["--direction", "ingress"]), env)  # type: ignore[arg-type]
    assert (values["max_body_bytes"], values["direction"]) == (5, "ingress")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("flowtap:\n  direction: egres\n", ":2: flowtap.direction: 'egres' is not one of egress"),
        (
            "flowtap:\n  max_body_byte: 1\n",
            ":2: flowtap.max_body_byte: not a setting (did you mean max_body_bytes?)",
        ),
        ("flowtapp: {}\n", ":1: flowtapp: not a known section (did you mean flowtap?)"),
        (
            "flowtap:\n  max_body_bytes: many\n",
            ":2: flowtap.max_body_bytes: 'many' is not a whole number",
        ),
        ("flowtap:\n  redact: 1\n", ":2: flowtap.redact: 1 is not true or false"),
        ("flowtap:\n  pids: 3\n", ":2: flowtap.pids: 3 is not a list"),
        ("flowtap: [\n", ":2: not valid YAML"),
        ("- a\n", ":1: the file must be a mapping"),
        ("flowtap:\n  color: never\n", ":2: flowtap.color: not a setting"),
    ],
)
def test_yaml_errors_name_file_line_and_setting(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SettingError) as caught:
        resolve(_given(["--config", str(path)]), {})  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"{path}{message}"), str(caught.value)


def test_yaml_too_large_and_alias_bomb(tmp_path: Path) -> None:
    big = _write(tmp_path, "#" * (10 << 20))
    with pytest.raises(SettingError, match=r"10485760 bytes: a configuration file is at most"):
        resolve(_given(["--config", str(big)]), {})  # type: ignore[arg-type]
    # Each anchor is ten of the one before: 10^7 values from a 300-byte file.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "flowtap:\n  exe_patterns:\n"
        + "".join(
            f"    - &{c} [" + ", ".join([f"*{p}"] * 10) + "]\n"
            for p, c in zip("abcdefg", "bcdefgh", strict=True)
        ).replace("*a", "x")
    )
    with pytest.raises(SettingError, match=r"more than 100000 values"):
        resolve(_given(["--config", str(bomb)]), {})  # type: ignore[arg-type]


def test_main_reports_the_file_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "# comment\nflowtap:\n  direction: egres\n")
    assert main(["run", "--config", str(path)]) == 2
    assert f"flowtap: {path}:3: flowtap.direction: 'egres' is not one of" in (
        capsys.readouterr().err
    )


def test_validation_names_the_source(tmp_path: Path) -> None:
    path = _write(tmp_path, "flowtap:\n  exec_hold_ms: 90000\n  tls_probes: [rustls]\n")
    config = config_from_args(_given(["--config", str(path)]), environ={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=rf"^{path}:3: flowtap.tls_probes rustls: not a TLS"):
        config.validate()
    env = {"FLOWTAP_MAX_BODY_BYTES": "-1"}
    config = config_from_args(_given([]), environ=env)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^\$FLOWTAP_MAX_BODY_BYTES -1: use 0 or more"):
        config.validate()


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path, "flowtap:\n  capture_level: full\n")
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"
    qtap = tmp_path / "qtap.yaml"
    qtap.write_text("version: 2\ntapp: {}\n")
    assert main(["validate", str(qtap)]) == 2
    assert capsys.readouterr().err == (
        f"flowtap: {qtap}:2: tapp: not a known section (did you mean tap?)\n"
    )
