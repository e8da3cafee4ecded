"""The one declaration of every setting: flags derived from it, and precedence
defaults < environment < flags actually given (nothing is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowtap.cli import build_parser, config_from_args, main
from flowtap.config import SensorConfig
from flowtap.settings.options import OPTIONS, SettingError
from flowtap.settings.resolve import resolve


def _given(argv: list[str]) -> object:
    args = build_parser(given_only=True).parse_args(["run", *argv])
    args._given_only = True
    return args


def test_every_config_field_is_declared_once() -> None:
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    declared = {option.name for option in OPTIONS if option.in_config}
    assert declared == set(SensorConfig.__dataclass_fields__)


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
