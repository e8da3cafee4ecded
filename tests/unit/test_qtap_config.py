"""Qtap's configuration format (version 2): what flowtap reads, what it refuses and where."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowtap.cli import build_parser, config_from_args
from flowtap.config import SensorConfig
from flowtap.protocols.messages import Request, Response, Transaction
from flowtap.records.http import ConnectionContext, HttpRecordOptions
from flowtap.records.policy import CapturePolicy, CaptureRule, EndpointCapture
from flowtap.settings import yamlfile
from flowtap.settings.options import SettingError
from flowtap.tracking.exe_filters import GROUPS, ExeFilter, filter_matcher
from flowtap.tracking.processes import ProcessInfo

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qtap.yaml"


def _config(path: Path, *argv: str) -> SensorConfig:
    # As main() parses: only the flags on the command line are in the namespace.
    args = build_parser(given_only=True).parse_args(["run", "--config", str(path), *argv])
    args._given_only = True
    return config_from_args(args, environ={})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qtap.yaml"
    path.write_text(text)
    return path


def test_the_example_file_runs_unchanged() -> None:
    config = _config(EXAMPLE)
    assert config.capture_level == "summary"
    assert config.direction == "egress"
    assert config.include_loopback is True
    assert config.http_rules == (
        CaptureRule("headers of curl", 'src.process.binary == "curl"', "headers", f"{EXAMPLE}:27"),
    )
    assert config.http_endpoints == (
        EndpointCapture(
            "*.api.example.com",
            "summary",
            (CaptureRule("full capture of API errors", "failed()", "full", f"{EXAMPLE}:47"),),
        ),
    )
    assert config.rule_macros == (("failed", "http.res.status >= 500"),)
    assert config.output == "json"  # http_capture's format: json
    assert config.origins["capture_level"] == f"{EXAMPLE}:54: tap.http.stack"
    assert len(config.exe_filters) == len(GROUPS["container"]) + 1
    assert config.exe_filters[-1] == ExeFilter("/usr/sbin/", "prefix")


def test_flags_win_over_the_file() -> None:
    config = _config(EXAMPLE, "--capture-level", "none", "--direction", "all")
    assert (config.capture_level, config.direction) == ("none", "all")
    assert config.http_rules  # rules stay: they have no flag


def _transaction(host: str, status: int) -> Transaction:
    request = Request("GET", "/v1/x", "1.1", [("Host", host)], authority=host)
    return Transaction(request, Response(status, "", "1.1", []))


def test_policy_of_the_example_picks_each_level() -> None:
    config = _config(EXAMPLE)
    policy = CapturePolicy(
        HttpRecordOptions(config.capture_level),
        config.http_rules,
        config.rule_macros,
        config.http_endpoints,
    )
    assert policy.highest_level == "full"

    def level(host: str, status: int, exe: str) -> str:
        process = {"pid": 1, "exe": exe}
        ctx = ConnectionContext(1, process, "egress", True, "openssl", "192.0.2.1", 443)
        return policy.options_for(_transaction(host, status), ctx).level

    assert level("eu.api.example.com", 503, "/usr/bin/python3") == "full"
    assert level("eu.api.example.com:8443", 500, "/usr/bin/curl") == "full"  # endpoint first
    assert level("eu.api.example.com", 200, "/usr/bin/curl") == "summary"
    assert level("api.example.com", 503, "/usr/bin/python3") == "summary"  # not a subdomain
    assert level("api.example.org", 200, "/usr/bin/curl") == "headers"
    assert policy.chosen == {"full capture of API errors": 2, "headers of curl": 1}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("version: 3\n", ":1: version: 3: this build reads version 2"),
        (
            "tap:\n  direction: egres\n",
            ":2: tap.direction: 'egres' is not one of all, egress, egress-external, "
            "egress-internal, ingress",
        ),
        ("tap:\n  audit_include_dns: 1\n", ":2: tap.audit_include_dns: not true or false"),
        ("tap:\n  htp: {}\n", ":2: tap.htp: unknown key (did you mean http?)"),
        ("tap:\n  http:\n    stack: nope\n", ":3: tap.http.stack: no stack named 'nope'"),
        (
            "stacks:\n  s:\n    plugins:\n      - type: http_captur\n",
            ":4: stacks.s.plugins[0].type: 'http_captur': not a plugin "
            "(did you mean http_capture?)",
        ),
        (
            "stacks:\n  s:\n    plugins:\n      - type: access_log\n",
            ":4: stacks.s.plugins[0].type: 'access_log': not a plugin (did you mean access_logs?)",
        ),
        (
            "stacks:\n  s:\n    plugins:\n      - type: http_capture\n        config:\n"
            "          level: everything\n",
            ":6: stacks.s.plugins[0].config.level: 'everything' is not one of details, full, "
            "headers, none, summary",
        ),
        (
            "stacks:\n  s:\n    plugins:\n      - type: http_capture\n        config:\n"
            "          rules:\n            - expr: http.res.status >=\n              level: full\n",
            ":7: stacks.s.plugins[0].config.rules[0].expr: column 19: expected a field or a value",
        ),
        (
            "stacks:\n  s:\n    plugins:\n      - type: http_capture\n        config:\n"
            "          rules:\n            - expr: http.req.path matches /(a+)+$/\n"
            "              level: full\n",
            ":7: stacks.s.plugins[0].config.rules[0].expr: column 23: regular expression repeats",
        ),
        (
            "stacks:\n  s:\n    plugins:\n      - type: http_capture\n        config:\n"
            "          rules:\n            - expr: http.res.statuss == 1\n"
            "              level: full\n",
            ":7: stacks.s.plugins[0].config.rules[0].expr: column 1: unknown field",
        ),
        (
            "services:\n  event_stores:\n    - type: kafka\n",
            ":3: services.event_stores[0].type: 'kafka': this build has the stdout and otel stores "
            "only",
        ),
        (
            "services:\n  event_stores:\n    - type: otel\n      protocol: grpc\n",
            ":3: services.event_stores[0]: an otel store needs an endpoint",
        ),
        (
            "services:\n  event_stores:\n    - type: otel\n      endpoint: h:1\n"
            "      headers:\n        api-key:\n"
            "          type: env\n          value: NO_SUCH_VAR_X\n",
            ":7: services.event_stores[0].headers.api-key: the environment has no NO_SUCH_VAR_X",
        ),
        (
            "rulekit:\n  macros:\n    - name: a\n      expr: a()\n",
            ":4: rulekit.macros[0].expr: column 1: macro calls itself: a -> a",
        ),
        ("stacks: [1]\n", ":1: stacks: must be a mapping of stacks"),
        ("tap:\n  ignore_loopback: maybe\n", ":2: tap.ignore_loopback: not true or false"),
    ],
)
def test_refusals_name_the_place(tmp_path: Path, text: str, error: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SettingError) as caught:
        yamlfile.load(path)
    assert str(caught.value).startswith(f"{path}{error}"), str(caught.value)


def test_a_rule_error_shows_where_in_the_expression(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "stacks:\n  s:\n    plugins:\n      - type: http_capture\n        config:\n"
        "          rules:\n            - expr: dst.port == 80 and and\n              level: full\n",
    )
    with pytest.raises(SettingError) as caught:
        yamlfile.load(path)
    assert str(caught.value).splitlines()[1:] == [
        "  dst.port == 80 and and",
        "                     ^",
    ]


def _traced(filters_yaml: str, tmp_path: Path, exe: str) -> bool:
    path = _write(tmp_path, "tap:\n  filters:\n" + filters_yaml)
    values, _origins = yamlfile.load(path)
    info = ProcessInfo(1, exe, Path(exe).name, (exe,), 0, "root", None)
    return filter_matcher(values["exe_filters"])(info)


@pytest.mark.parametrize(
    ("filters", "exe", "traced"),
    [
        (
            "    custom:\n      - exe: /usr/bin/curl\n        strategy: exact\n",
            "/usr/bin/curl",
            False,
        ),
        ("    custom:\n      - exe: /usr/bin/curl\n", "/usr/local/bin/curl", True),
        (
            "    custom:\n      - exe: /usr/bin/python\n        strategy: prefix\n",
            "/usr/bin/python3.11",
            False,
        ),
        ("    custom:\n      - exe: /ruby\n        strategy: suffix\n", "/opt/bin/ruby", False),
        (
            "    custom:\n      - exe: java\n        strategy: contains\n",
            "/opt/jdk/bin/java",
            False,
        ),
        (
            "    custom:\n      - exe: .*ruby[0-9]*$\n        strategy: regex\n",
            "/usr/bin/ruby3",
            False,
        ),
        (
            "    custom:\n      - exe: .*ruby[0-9]*$\n        strategy: regex\n",
            "/usr/bin/rubyx",
            True,
        ),
        ("    custom:\n      - exe: /usr/bin/curl\n        only: true\n", "/usr/bin/wget", False),
        ("    custom:\n      - exe: /usr/bin/curl\n        only: true\n", "/usr/bin/curl", True),
        ("    groups: [container, qpoint]\n", "/usr/bin/containerd", False),
        ("    groups: [container, qpoint]\n", "/usr/local/bin/flowtap", False),
        ("    groups: [container, qpoint]\n", "/usr/bin/curl", True),
    ],
)
def test_process_filters(filters: str, exe: str, traced: bool, tmp_path: Path) -> None:
    assert _traced(filters, tmp_path, exe) is traced


@pytest.mark.parametrize(
    ("filters", "error"),
    [
        ("    groups: [kubernetess]\n", "tap.filters.groups[0]: 'kubernetess' is not one of"),
        (
            "    custom:\n      - exe: x\n        strategy: glob\n",
            "tap.filters.custom[0].strategy: 'glob' is not one of contains, exact, prefix, regex",
        ),
        ("    custom:\n      - strategy: exact\n", "tap.filters.custom[0]: needs an exe"),
        (
            "    custom:\n      - exe: (a*)*b\n        strategy: regex\n",
            "tap.filters.custom[0].exe: regular expression repeats a repeated group",
        ),
        (
            "    custom:\n      - exe: x\n        onlyy: true\n",
            "tap.filters.custom[0].onlyy: unknown key (did you mean only?)",
        ),
    ],
)
def test_process_filter_refusals(filters: str, error: str, tmp_path: Path) -> None:
    path = _write(tmp_path, "tap:\n  filters:\n" + filters)
    with pytest.raises(SettingError, match=re.escape(error)):
        yamlfile.load(path)


def test_endpoint_stacks_must_write_the_same_format(tmp_path: Path) -> None:
    stack = "    plugins:\n      - type: http_capture\n        config:\n          format: {}\n"
    path = _write(
        tmp_path,
        "stacks:\n  a:\n"
        + stack.format("json")
        + "  b:\n"
        + stack.format("text")
        + "tap:\n  http:\n    stack: a\n  endpoints:\n    - domain: x.test\n"
        "      http:\n        stack: b\n",
    )
    with pytest.raises(SettingError) as caught:
        yamlfile.load(path)
    assert str(caught.value) == (
        f"{path}:18: tap.endpoints[0].http.stack: its http_capture format is text, the "
        "tap.http.stack's is json: flowtap writes one format; make them the same"
    )


def test_the_otel_event_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qtap's `type: otel` event store becomes the --otel-* settings; a header's secret
    may come from the environment."""
    monkeypatch.setenv("FLOWTAP_TEST_OTEL_KEY", "k-secret")
    path = _write(
        tmp_path,
        "services:\n  event_stores:\n    - type: stdout\n    - type: otel\n"
        "      endpoint: collector:4318\n      protocol: http\n"
        "      service_name: edge\n      environment: prod\n"
        "      headers:\n        x-tenant: t1\n"
        "        api-key:\n          type: env\n          value: FLOWTAP_TEST_OTEL_KEY\n"
        "      tls:\n        insecure: false\n        ca_file: /etc/ca.pem\n",
    )
    values, origins = yamlfile.load(path)
    assert {k: v for k, v in values.items() if k.startswith("otel_")} == {
        "otel_endpoint": "collector:4318",
        "otel_protocol": "http",
        "otel_service_name": "edge",
        "otel_environment": "prod",
        "otel_headers": ("x-tenant=t1", "api-key=k-secret"),
        "otel_insecure": False,
        "otel_ca_file": Path("/etc/ca.pem"),
    }
    assert origins["otel_endpoint"] == f"{path}:5: services.event_stores[1].endpoint"
