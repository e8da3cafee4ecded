"""QPOINT_STRATEGY in Qtap's whole syntax, QPOINT_TAGS and env tags read from a process's
environment, and the records' last step (tags attached, DNS flows left out)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flowtap.egress.strategy import (
    ExeMatch,
    Strategy,
    StrategyError,
    StrategySpec,
    fill_running,
    kernel_strategy,
    parse_strategy,
    strategy_of_environment,
)
from flowtap.records.finish import RecordFinisher, is_dns_flow
from flowtap.tracking.environment import (
    MAX_TAGS,
    EnvironmentReader,
    EnvTag,
    normalize,
    parse_tags,
)
from flowtap.tracking.processes import ProcessRegistry


@pytest.mark.parametrize(
    ("value", "exe", "strategy"),
    [
        ("", "/usr/bin/curl", "observe"),
        ("observe", "/usr/bin/curl", "observe"),
        ("ignore", "/usr/bin/curl", "ignore"),
        ("audit", "/usr/bin/curl", "audit"),
        ("forward", "/usr/bin/curl", "forward"),
        ("proxy", "/usr/bin/curl", "proxy"),
        ("forward,exe.prefix:/usr/bin/python", "/usr/bin/python3.11", "forward"),
        ("forward,exe.prefix:/usr/bin/python", "/usr/bin/curl", "observe"),
        ("forward,prefix:/usr/bin/python", "/usr/bin/python3", "forward"),  # Qtap: exe. optional
        ("ignore,exe.exact:/usr/bin/curl", "/usr/bin/curl", "ignore"),
        ("ignore,exe.exact:/usr/bin/curl", "/usr/local/bin/curl", "observe"),
        ("audit,exe.suffix:/node", "/opt/node/bin/node", "audit"),
        ("audit,exe.contains:java", "/opt/jdk/bin/java", "audit"),
        ("audit,exe.regex:ruby[0-9]+$", "/usr/bin/ruby3", "audit"),
        ("audit,exe.regex:ruby[0-9]+$", "/usr/bin/rubyx", "observe"),
        # Any filter matching applies the strategy (Qtap's loop over the filters).
        ("ignore,exe.exact:/a,exe.suffix:/curl", "/usr/bin/curl", "ignore"),
        ("ignore,exe.exact:/usr/bin/curl", None, "observe"),  # executable not known
    ],
)
def test_strategy_syntax(value: str, exe: str | None, strategy: str) -> None:
    assert parse_strategy(value).for_exe(exe) == strategy


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("forwad", "'forwad' is not one of observe, ignore, audit, forward, proxy"),
        ("forward,exe.prefix", "a filter is exe.HOW:VALUE"),
        ("forward,exe.glob:/usr/*", "'glob' is not one of exact, prefix, suffix, contains"),
        ("forward,exe.prefix:", "no executable to match"),
        ("forward,exe.regex:(a+)+$", "regular expression repeats a repeated group"),
        ("forward," + ",".join(["exe.exact:/a"] * 17), "17 filters: at most 16"),
        ("x" * 5000, "5000 bytes: at most 4096"),
    ],
)
def test_strategy_refusals(value: str, error: str) -> None:
    with pytest.raises(StrategyError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_strategy(value)


def test_kernel_and_userspace_views() -> None:
    """The kernel reads bare forward and ignore only; userspace maps the rest."""
    assert strategy_of_environment(b"QPOINT_STRATEGY=forward,exe.prefix:/usr\0") is (
        Strategy.OBSERVE
    )
    assert strategy_of_environment(b"QPOINT_STRATEGY=forward\0") is Strategy.FORWARD
    assert [kernel_strategy(n) for n in ("observe", "ignore", "audit", "forward", "proxy")] == [
        Strategy.OBSERVE,
        Strategy.IGNORE,
        Strategy.OBSERVE,
        Strategy.FORWARD,
        Strategy.FORWARD,
    ]
    spec = parse_strategy("forward,exe.prefix:/usr/bin/python")
    assert spec == StrategySpec("forward", (ExeMatch("prefix", "/usr/bin/python"),))


@pytest.mark.parametrize(
    ("text", "tags", "problems"),
    [
        ("team:payments,env:prod", {"team": ["payments"], "env": ["prod"]}, 0),
        (" Team Name : Payments Core ", {"team-name": ["payments-core"]}, 0),
        ("a:1,a:2,a:1", {"a": ["1", "2"]}, 0),
        ("ctxid:x:y", {"ctxid": ["x:y"]}, 0),  # Qtap cuts at the first colon
        ("nocolon,ok:1", {"ok": ["1"]}, 1),
        ("k:,:v,ok:1", {"ok": ["1"]}, 2),
        (",,", {}, 0),
        ("x:" + "a" * 4095, {}, 1),  # over 4 KiB: ignored whole
    ],
)
def test_qpoint_tags(text: str, tags: dict[str, list[str]], problems: int) -> None:
    found, wrong = parse_tags(text)
    assert (found, len(wrong)) == (tags, problems)


def test_tags_are_bounded() -> None:
    found, wrong = parse_tags(",".join(f"k{i}:v" for i in range(MAX_TAGS + 5)))
    assert sum(len(v) for v in found.values()) == MAX_TAGS
    assert wrong == [f"QPOINT_TAGS has more than {MAX_TAGS} tags"]
    assert normalize("--Hello World!!") == "hello-world"


def _environ(**values: str) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in values.items())


def test_environment_reader_reads_only_what_it_needs(tmp_path: Path) -> None:
    reader = EnvironmentReader((EnvTag("team", "TEAM"), EnvTag("secret", "MISSING")))
    tags, spec = reader.from_environ(
        _environ(
            PATH="/bin",
            QPOINT_TAGS="env:prod,bad",
            TEAM="Payments",
            QPOINT_STRATEGY="audit,exe.suffix:/curl",
        )
    )
    assert tags == (("env", ("prod",)), ("team", ("payments",)))
    assert spec.for_exe("/usr/bin/curl") == "audit"
    assert reader.stats.bad_tags == 1
    # A bad strategy is observed, counted, never raised.
    _, spec = reader.from_environ(_environ(QPOINT_STRATEGY="sideways"))
    assert spec.name == "observe" and reader.stats.bad_strategies == 1
    # A process whose environment cannot be read: no tags, observed.
    assert reader.read(999_999_999, tmp_path) == ((), StrategySpec())
    assert reader.stats.unreadable == 1


def test_registry_keeps_tags_and_strategy(tmp_path: Path) -> None:
    base = tmp_path / "77"
    base.mkdir()
    (base / "status").write_text("Name:\tcurl\nUid:\t0\t0\t0\t0\nPPid:\t1\n")
    (base / "cmdline").write_bytes(b"curl\0http://x\0")
    (base / "environ").write_bytes(_environ(QPOINT_TAGS="team:payments", QPOINT_STRATEGY="audit"))
    registry = ProcessRegistry(tmp_path)
    assert registry.scan() == 1
    assert registry.tags_of(77) == (("team", ("payments",)),)
    assert registry.strategy_of(77) == "audit"
    assert registry.tags_of(78) == () and registry.strategy_of(78) == "observe"


def _conn(**fields: object) -> dict[str, object]:
    record: dict[str, object] = {
        "type": "connection",
        "event": "close",
        "process": {"pid": 5},
        "socket_protocol": "udp",
        "local": {"ip": "10.0.0.2", "port": 40000},
        "remote": {"ip": "10.0.0.1", "port": 53},
    }
    record.update(fields)
    return record


def test_finisher_attaches_tags_and_leaves_out_dns() -> None:
    tags = {5: (("team", ("payments",)),)}
    finisher = RecordFinisher(lambda pid: tags.get(pid, ()), include_dns=False)
    assert is_dns_flow(_conn())
    assert is_dns_flow(_conn(socket_protocol="tcp", remote={"port": 853}, l7_protocol="dns"))
    assert not is_dns_flow(_conn(socket_protocol="tcp", l7_protocol="tls"))
    assert not is_dns_flow({"type": "http", "remote": {"port": 53}})
    assert finisher.finish(_conn()) is None
    assert finisher.dns_dropped == 1
    kept = finisher.finish(_conn(remote={"ip": "10.0.0.1", "port": 443}))
    assert kept is not None and kept["tags"] == {"team": ["payments"]}
    untagged = finisher.finish(_conn(process={"pid": 6}, remote={"port": 80}))
    assert untagged is not None and "tags" not in untagged
    assert RecordFinisher(lambda pid: ()).finish(_conn()) is not None  # DNS kept by default


class _FakeMap:
    def __init__(self) -> None:
        self.entries: dict[bytes, bytes] = {}

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self.entries[key] = value


def test_fill_running_reads_the_whole_syntax(tmp_path: Path) -> None:
    """Processes already running: their executable is known, so exe filters apply, and
    proxy is written as forward."""
    for pid, value, exe in (
        (11, "forward,exe.prefix:/usr/bin/python", "/usr/bin/python3.11"),
        (12, "forward,exe.prefix:/usr/bin/python", "/usr/bin/curl"),
        (13, "proxy", "/usr/bin/curl"),
        (14, "ignore,exe.suffix:/curl", "/usr/bin/curl"),
        (15, "audit", "/usr/bin/curl"),
        (16, "sideways", "/usr/bin/curl"),
    ):
        base = tmp_path / str(pid)
        base.mkdir()
        (base / "environ").write_bytes(_environ(QPOINT_STRATEGY=value))
        (base / "exe").symlink_to(exe)
    strategies, in_use = _FakeMap(), _FakeMap()
    found = fill_running(strategies, in_use, tmp_path)  # type: ignore[arg-type]
    assert found == {Strategy.FORWARD: 2, Strategy.IGNORE: 1}
    assert {int.from_bytes(k, "little"): v[0] for k, v in strategies.entries.items()} == {
        11: Strategy.FORWARD,
        13: Strategy.FORWARD,
        14: Strategy.IGNORE,
    }
    assert in_use.entries == {(0).to_bytes(4, "little"): (1).to_bytes(4, "little")}


def test_process_matcher_leaves_out_ignored_processes() -> None:
    from flowtap.config import SensorConfig  # noqa: PLC0415
    from flowtap.sensor import process_matcher  # noqa: PLC0415
    from flowtap.tracking.processes import ProcessInfo  # noqa: PLC0415

    matches = process_matcher(SensorConfig())
    curl = ProcessInfo(1, "/usr/bin/curl", "curl", ("curl",), 0, "root", None)
    assert matches(curl)
    assert not matches(dataclasses.replace(curl, strategy="ignore"))
    assert matches(dataclasses.replace(curl, strategy="audit"))
