"""Qtap's access_logs, http_metrics, report_usage and debug plugins, the file's `tags` and
`tap.audit_include_dns`: how the file reads, what each refuses, what the policy emits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from flowtap.protocols.messages import Body, Request, Response, Transaction
from flowtap.records.access_log import AccessLogs, access_log_record, console_line
from flowtap.records.connection import WallClock
from flowtap.records.http import ConnectionContext, HttpRecordOptions
from flowtap.records.policy import CapturePolicy, CaptureRule, EndpointCapture
from flowtap.settings import yamlfile
from flowtap.settings.options import SettingError
from flowtap.tracking.environment import EnvTag


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qtap.yaml"
    path.write_text(text)
    return path


def _stack(plugins: str) -> str:
    return "stacks:\n  s:\n    plugins:\n" + plugins + "tap:\n  http:\n    stack: s\n"


ACCESS = """\
      - type: access_logs
        config:
          mode: details
          format: json
          rules:
            - name: errors in full
              expr: http.res.status >= 500
              mode: full
            - expr: http.req.path == "/quiet"
              mode: none
"""


def test_access_logs_read(tmp_path: Path) -> None:
    path = _write(tmp_path, _stack(ACCESS))
    values, origins = yamlfile.load(path)
    assert values["access_logs"] == AccessLogs(
        "details",
        "json",
        (
            CaptureRule("errors in full", "http.res.status >= 500", "full", f"{path}:10"),
            CaptureRule(
                'http.req.path == "/quiet"', 'http.req.path == "/quiet"', "none", f"{path}:12"
            ),
        ),
    )
    # A stack without http_capture records no HTTP transactions of its own.
    assert values["capture_level"] == "none"
    assert origins["access_logs"] == f"{path}:16: tap.http.stack"


def test_access_logs_defaults_and_other_plugins(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _stack(
            "      - type: http_metrics\n      - type: access_logs\n"
            "      - type: report_usage\n      - type: debug\n        config: {}\n"
            "      - type: http_capture\n"
        ),
    )
    values, _ = yamlfile.load(path)
    assert values["access_logs"] == AccessLogs("summary", "console", ())
    assert (values["http_metrics"], values["report_usage"], values["debug_rules"]) == (
        True,
        True,
        True,
    )
    assert values["capture_level"] == "summary"


def test_endpoint_stacks_carry_their_access_logs(tmp_path: Path) -> None:
    text = (
        "stacks:\n  a:\n    plugins:\n      - type: http_capture\n"
        "  b:\n    plugins:\n      - type: access_logs\n        config:\n          mode: full\n"
        "tap:\n  http:\n    stack: a\n  endpoints:\n    - domain: x.test\n"
        "      http:\n        stack: b\n"
    )
    values, _ = yamlfile.load(_write(tmp_path, text))
    assert values["access_logs"] is None
    assert values["http_endpoints"] == (
        EndpointCapture("x.test", "none", (), AccessLogs("full", "console", ())),
    )


P = "stacks:\n  s:\n    plugins:\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            P + "      - type: access_logs\n        config:\n          mode: everything\n",
            ":6: stacks.s.plugins[0].config.mode: 'everything' is not one of details, full, "
            "none, summary",
        ),
        (
            P + "      - type: access_logs\n        config:\n          format: text\n",
            ":6: stacks.s.plugins[0].config.format: 'text' is not one of console, json",
        ),
        (
            P + "      - type: access_logs\n        config:\n          level: full\n",
            ":6: stacks.s.plugins[0].config.level: unknown key",
        ),
        (
            P + "      - type: access_logs\n        config:\n          rules:\n"
            "            - expr: http.res.status >= 500\n              level: full\n",
            ":8: stacks.s.plugins[0].config.rules[0].level: unknown key",
        ),
        (
            P + "      - type: access_logs\n        config:\n          rules:\n"
            "            - expr: http.res.status >= 500\n",
            ":7: stacks.s.plugins[0].config.rules[0]: a rule needs an expr and a mode",
        ),
        (
            P + "      - type: access_logs\n        config:\n          rules:\n"
            "            - expr: http.res.statuss >= 500\n              mode: full\n",
            ":7: stacks.s.plugins[0].config.rules[0].expr: column 1: unknown field",
        ),
        (
            P + "      - type: http_metrics\n        config:\n          port: 9\n",
            ":6: stacks.s.plugins[0].config: http_metrics takes no config",
        ),
        (
            P + "      - type: debug\n        config:\n          mode: full\n",
            ":6: stacks.s.plugins[0].config: debug takes no config",
        ),
        (
            P + "      - type: access_logs\n      - type: access_logs\n",
            ":5: stacks.s.plugins[1].type: a second access_logs in the stack",
        ),
        (
            P + "      - type: detect_errors\n",
            ":4: stacks.s.plugins[0].type: 'detect_errors': not a plugin",
        ),
        (
            "tags:\n  - key: team\n    source: k8s.label\n    location: team\n",
            ":3: tags[0].source: k8s.label: flowtap reads no Kubernetes or container labels",
        ),
        (
            "tags:\n  - key: team\n    source: envv\n    location: TEAM\n",
            ":3: tags[0].source: 'envv': not a tag source (did you mean env?)",
        ),
        ("tags:\n  - key: team\n    source: env\n", ":2: tags[0]: a tag needs location"),
        (
            "tags:\n  - key: '--'\n    source: env\n    location: TEAM\n",
            ":2: tags[0].key: an empty key",
        ),
        (
            "tags:\n  - key: team\n    source: env\n    location: 'A=B'\n",
            ":4: tags[0].location: 'A=B' is not an environment variable name",
        ),
        ("tags: {}\n", ":1: tags: must be a list"),
    ],
)
def test_refusals(tmp_path: Path, text: str, error: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SettingError) as caught:
        yamlfile.load(path)
    assert str(caught.value).startswith(f"{path}{error}"), str(caught.value)


def test_tags_from_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "tags:\n  - key: Team Name\n    source: env\n    location: TEAM\n"
        "  - key: env\n    source: env\n    location: DEPLOY_ENV\n",
    )
    values, origins = yamlfile.load(path)
    assert values["env_tags"] == (EnvTag("team-name", "TEAM"), EnvTag("env", "DEPLOY_ENV"))
    assert origins["env_tags"] == f"{path}:1: tags"


@pytest.mark.parametrize(
    ("text", "include"),
    [
        ("version: 2\n", None),  # no tap section: flowtap's default (DNS flows recorded)
        ("tap:\n  direction: egress\n", False),  # Qtap's default
        ("tap:\n  audit_include_dns: true\n", True),
        ("tap:\n  audit_include_dns: false\n", False),
    ],
)
def test_audit_include_dns(tmp_path: Path, text: str, include: bool | None) -> None:
    values, _ = yamlfile.load(_write(tmp_path, text))
    assert values.get("audit_include_dns") is include


# --- the records --------------------------------------------------------------------


def _tx(path: str = "/v1/x", status: int = 200, body: bytes = b'{"ok":true}') -> Transaction:
    request = Request(
        "POST",
        path + "?token=abc",
        "1.1",
        [("Host", "api.test"), ("Authorization", "Bearer s3cret"), ("Content-Type", "text/plain")],
        authority="api.test",
        body=Body(bytearray(b"hello"), 5),
        start_ns=1_000_000_000,
    )
    response = Response(
        status,
        "OK",
        "1.1",
        [("Content-Type", "application/json")],
        Body(bytearray(body), len(body)),
    )
    return Transaction(request, response)


CTX = ConnectionContext(
    7, {"pid": 42, "exe": "/usr/bin/curl", "comm": "curl"}, "egress", False, "plaintext"
)


def test_access_log_fields_at_each_mode() -> None:
    clock = WallClock()
    options = HttpRecordOptions("full")
    summary = access_log_record(
        _tx(), CTX, mode="summary", fmt="json", options=options, clock=clock
    )
    assert summary is not None
    del summary["timestamp"]
    assert summary == {
        "type": "access_log",
        "connection_id": 7,
        "mode": "summary",
        "format": "json",
        "msg": "HTTP transaction",
        "process": CTX.process,
        "bin": "/usr/bin/curl",
        "direction": "egress",
        "method": "POST",
        "url": "http://api.test/v1/x?token=[REDACTED]",
        "status": 200,
    }
    full = access_log_record(_tx(), CTX, mode="full", fmt="json", options=options, clock=clock)
    assert full is not None
    assert full["meta"] == {
        "bytes_sent": 5,
        "bytes_received": 11,
        "pid": 42,
        "exe": "/usr/bin/curl",
    }
    assert full["request"] == {
        "url": "http://api.test/v1/x?token=[REDACTED]",
        "method": "POST",
        "proto": "http1",
        "headers": {
            "Host": "api.test",
            "Authorization": "Bearer [REDACTED]",
            "Content-Type": "text/plain",
        },
        "body": "hello",
    }
    assert full["response"] == {
        "status": 200,
        "headers": {"Content-Type": "application/json"},
        "body": '{"ok":true}',
    }
    details = access_log_record(
        _tx(body=b"\xff\xfe"), CTX, mode="details", fmt="console", options=options, clock=clock
    )
    assert details is not None and "body" not in details["response"]
    binary = access_log_record(
        _tx(body=b"\xff\xfe"), CTX, mode="full", fmt="console", options=options, clock=clock
    )
    assert binary is not None and binary["response"]["body"] == "<binary>"
    assert (
        access_log_record(_tx(), CTX, mode="none", fmt="json", options=options, clock=clock) is None
    )


def test_console_lines() -> None:
    clock = WallClock()
    options = HttpRecordOptions("full")
    summary = access_log_record(
        _tx(), CTX, mode="summary", fmt="console", options=options, clock=clock
    )
    assert summary is not None
    assert console_line(summary) == "■ curl → POST http://api.test/v1/x?token=[REDACTED] 200"
    details = access_log_record(
        _tx(), CTX, mode="details", fmt="console", options=options, clock=clock
    )
    assert details is not None
    assert console_line(details).splitlines()[1:] == [
        "  > Host: api.test",
        "  > Authorization: Bearer [REDACTED]",
        "  > Content-Type: text/plain",
        "  < Content-Type: application/json",
    ]
    as_json = access_log_record(
        _tx(), CTX, mode="summary", fmt="json", options=options, clock=clock
    )
    assert as_json is not None
    assert console_line(as_json).startswith('{"type":"access_log","timestamp":')


def _policy(
    emitted: list[dict[str, Any]],
    audited: frozenset[int] = frozenset(),
    **kwargs: Any,
) -> CapturePolicy:
    logs = AccessLogs(
        "summary",
        "json",
        (
            CaptureRule("errors", "http.res.status >= 500", "full", "f:1"),
            CaptureRule("quiet", 'http.req.path == "/quiet"', "none", "f:2"),
        ),
    )
    return CapturePolicy(
        HttpRecordOptions("headers"),
        access_logs=logs,
        emit=emitted.append,
        audited=lambda pid: pid in audited,
        **kwargs,
    )


def test_policy_emits_one_access_log_per_transaction_first_rule_wins() -> None:
    emitted: list[dict[str, Any]] = []
    policy = _policy(emitted)
    assert policy.highest_level == "full"  # the access log's full rule needs bodies
    assert policy.options_for(_tx(status=503), CTX).level == "headers"
    assert policy.options_for(_tx(), CTX).level == "headers"
    assert policy.options_for(_tx(path="/quiet", status=503), CTX).level == "headers"
    # errors, the default, and errors again: first match wins, before quiet is looked at
    assert [r["mode"] for r in emitted] == ["full", "summary", "full"]
    assert policy.options_for(_tx(path="/quiet"), CTX).level == "headers"
    assert len(emitted) == 3  # quiet: mode none, no line
    assert policy.access_logs == 3
    assert policy.chosen == {"errors": 2, "quiet": 1}


def test_audit_strategy_gets_no_payload_records() -> None:
    emitted: list[dict[str, Any]] = []
    policy = _policy(emitted, audited=frozenset({42}))
    assert policy.options_for(_tx(), CTX).level == "none"
    assert emitted == []


def test_debug_logs_each_decision(caplog: pytest.LogCaptureFixture) -> None:
    rules = (CaptureRule("big", "http.res.status >= 500", "full", "f:1"),)
    policy = CapturePolicy(HttpRecordOptions("summary"), rules, debug=True)
    with caplog.at_level(logging.DEBUG, logger="flowtap.rules"):
        policy.options_for(_tx(status=500), CTX)
        policy.options_for(_tx(), CTX)
    assert [r.getMessage() for r in caplog.records] == [
        "rule big chose full for POST api.test/v1/x?token=[REDACTED]",
        "rule (default) chose summary for POST api.test/v1/x?token=[REDACTED]",
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_example_file_has_every_plugin() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "qtap.yaml"
    values, _ = yamlfile.load(example)
    assert values["access_logs"] == AccessLogs(
        "summary",
        "console",
        (CaptureRule("server errors in full", "failed()", "full", f"{example}:35"),),
    )
    assert (values["http_metrics"], values["report_usage"]) == (True, True)
    assert values["audit_include_dns"] is False
    assert values["env_tags"] == (EnvTag("team", "TEAM"),)
