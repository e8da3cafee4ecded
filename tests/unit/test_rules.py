"""The rule language: parser errors with their columns, evaluation against transactions."""

from __future__ import annotations

import pytest

from flowtap.protocols.messages import Request, Response, Transaction
from flowtap.rules.evaluate import compile_rule
from flowtap.rules.fields import Peer, Subject, TransactionFields, is_known
from flowtap.rules.levels import compile_rules
from flowtap.rules.syntax import RuleSyntaxError, parse


def fields(
    *,
    method: str = "POST",
    target: str = "/v1/charges?expand=1",
    host: str = "api.stripe.com:443",
    status: int | None = 502,
    exe: str = "/usr/bin/curl",
    ip: str = "10.1.2.3",
    port: int = 443,
) -> TransactionFields:
    request = Request(
        method,
        target,
        "1.1",
        [("Host", host), ("Content-Type", "application/json"), ("X-Trace", "abc123")],
        authority=host,
    )
    response = (
        Response(status, "Bad Gateway", "1.1", [("Retry-After", "30")])
        if status is not None
        else None
    )
    process = {"pid": 4242, "exe": exe, "uid": 1000, "user": "alice", "container_id": None}
    peer = Peer(
        ip=ip,
        port=port,
        domain="api.stripe.com",
        tls=True,
        tls_version="TLS 1.3",
        sni="api.stripe.com",
    )
    subject = Subject(Transaction(request, response), process, "egress", "http1", peer)
    return TransactionFields(subject)


TABLE = [
    ('http.req.method == "POST"', True),
    ('http.req.method eq "GET"', False),
    ("http.res.status >= 500", True),
    ("http.res.status ge 500 and http.res.status lt 503", True),
    ("res.status >= 400 && res.status < 500", False),
    ('req.host == "api.stripe.com"', True),
    ('http.req.path == "/v1/charges"', True),
    ('http.req.url == "https://api.stripe.com:443/v1/charges?expand=1"', True),
    ('http.req.path starts_with "/v1/"', True),
    ('http.req.path ends_with "charges"', True),
    ('http.req.path contains "charge"', True),
    ("http.req.path matches /^\\/v[0-9]+\\//", True),
    ('http.req.headers.content-type == "application/json"', True),
    ('http.req.headers.x-trace == "abc124"', False),
    ('http.res.headers.retry-after == "30"', True),
    ("http.res.headers.retry-after > 10", True),
    ('src.process.binary == "curl"', True),
    ('src.process.path starts_with "/usr/bin/"', True),
    ('src.process.user.name == "alice" and src.process.user.id == 1000', True),
    ("dst.ip in 10.0.0.0/8", True),
    ("dst.ip in [192.168.0.0/16, 172.16.0.0/12]", False),
    ("dst.ip == 10.1.2.3", True),
    ("dst.port in [80, 443]", True),
    ('in_zone(dst.domain, "stripe.com")', True),
    ('in_zone(dst.domain, "example.com")', False),
    ("tls.enabled", True),
    ('tls.sni == "api.stripe.com" and tls.version == "TLS 1.3"', True),
    ('direction == "egress"', True),
    ('protocol == "http1"', True),
    ('not (http.req.method == "GET")', True),
    ('! http.req.method == "POST"', False),
    ('http.req.method == "GET" or http.res.status == 502', True),
    ('http.req.method == "GET" || (http.res.status == 502 && dst.port == 443)', True),
    ('"POST" == http.req.method', True),
    ('http.req.method in ["GET", "POST"]', True),
    # a field the transaction lacks: every comparison with it is false, never an error
    ('src.container.id == "abc"', False),
    ('not src.container.id == "abc"', True),
    ("src.container.id", False),
    ("http.req.method > 5", False),  # not numbers: no match, no exception
]


@pytest.mark.parametrize(("expression", "expected"), TABLE)
def test_rule_table(expression: str, expected: bool) -> None:
    rule = compile_rule(expression, known_fields=is_known)
    assert rule.matches(fields()) is expected


def test_missing_response_makes_status_rules_false() -> None:
    rule = compile_rule("http.res.status >= 500")
    assert rule.matches(fields(status=None)) is False
    assert compile_rule("not http.res.status >= 500").matches(fields(status=None)) is True


@pytest.mark.parametrize(
    ("expression", "column", "message"),
    [
        ("", 0, "empty rule"),
        ("http.req.method ==", 18, "expected a field or a value"),
        ('http.req.method == "GET', 19, "closing quote"),
        ("http.res.status >= 500 500", 23, "missing 'and' or 'or'"),
        ("(http.res.status >= 500", 23, "expected ')'"),
        ("http.req.path matches /abc", 22, "closing /"),
        ("http.req.path matches /(a+)+$/", 22, "catastrophic backtracking"),
        ("http.req.path matches /(a|b)\\1/", 22, "backreferences"),
        ("http.req.path matches /[a-/", 22, "bad regular expression"),
        ('http.req.path matches "abc"', 14, "'matches' takes a /regular expression/"),
        ("dst.ip in 10.0.0.300/8", 10, "not a number, address or network"),
        ("http.req.method == GET $", 23, "unexpected character '$'"),
        ('http.req.methd == "GET"', 0, "unknown field 'http.req.methd'"),
        ("is_internal()", 0, "unknown macro or function 'is_internal'"),
        ("in_zone(dst.domain)", 0, "in_zone() takes two arguments"),
        ("dst.port in [80, dst.ip]", 17, "a list holds values only"),
        ("==", 0, "expected a field or a value"),
        ("and dst.port == 1", 0, "'and' needs a value on its left"),
        ("(" * 70 + "tls.enabled" + ")" * 70, 64, "nested more than 64 levels"),
    ],
)
def test_malformed_rules_name_their_column(expression: str, column: int, message: str) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        compile_rule(expression, known_fields=is_known)
    assert caught.value.column == column, caught.value.pointer()
    assert message in caught.value.message
    assert caught.value.pointer().splitlines()[1] == " " * column + "^"


def test_rule_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(RuleSyntaxError, match="longer than 4096"):
        parse("tls.enabled or " * 400 + "tls.enabled")


def test_macros_expand_and_recursion_is_refused() -> None:
    macros = {
        "is_stripe": 'in_zone(dst.domain, "stripe.com")',
        "failed": "http.res.status >= 500",
        "loop_a": "loop_b()",
        "loop_b": "loop_a()",
        "broken": "http.res.status >=",
    }
    assert compile_rule("is_stripe() and failed()", macros).matches(fields()) is True
    assert compile_rule("is_stripe() and not failed()", macros).matches(fields()) is False
    with pytest.raises(RuleSyntaxError, match="macro calls itself: loop_a -> loop_b -> loop_a"):
        compile_rule("loop_a()", macros)
    with pytest.raises(RuleSyntaxError, match="in macro 'broken'") as caught:
        compile_rule("tls.enabled and broken()", macros)
    assert caught.value.column == 16


def test_first_matching_rule_picks_the_level() -> None:
    rules = compile_rules(
        [
            (
                "errors on stripe",
                'in_zone(dst.domain, "stripe.com") and http.res.status >= 500',
                "full",
            ),
            ("curl", 'src.process.binary == "curl"', "headers"),
        ],
        default="summary",
    )
    assert rules.choose(fields()) == ("full", "errors on stripe")
    assert rules.choose(fields(status=200)) == ("headers", "curl")
    assert rules.choose(fields(status=200, exe="/usr/bin/wget")) == ("summary", None)


def test_regex_subjects_are_capped() -> None:
    # The regex sees the first 8 KiB of a value: a "z" past them is not found.
    rule = compile_rule("http.req.path matches /z$/")
    assert rule.matches(fields(target="/" + "a" * 100 + "z")) is True
    assert rule.matches(fields(target="/" + "a" * 10_000_000 + "z")) is False
