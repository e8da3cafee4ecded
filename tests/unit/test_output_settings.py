"""The output settings of issue 14's file rotation and Qtap format: flags, and `format`
on Qtap's event stores; the sinks make_sink builds from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowtap.cli import build_parser, make_sink
from flowtap.settings import yamlfile
from flowtap.settings.options import SettingError
from flowtap.settings.resolve import resolve
from flowtap.sinks.jsonl import JsonLinesSink, QtapJsonSink


def _values(*argv: str) -> dict[str, object]:
    args = build_parser(given_only=True).parse_args(["run", *argv])
    args._given_only = True
    values, _origins = resolve(args, {})
    return values


def test_format_per_event_store(tmp_path: Path) -> None:
    path = tmp_path / "qtap.yaml"
    path.write_text(
        "services:\n  event_stores:\n    - type: stdout\n      format: qtap\n"
        "    - type: otel\n      endpoint: h:4317\n      format: qtap\n"
    )
    values, origins = yamlfile.load(path)
    assert (values["output_format"], values["otel_format"]) == ("qtap", "qtap")
    assert origins["output_format"] == f"{path}:4: services.event_stores[0].format"
    path.write_text("services:\n  event_stores:\n    - type: stdout\n      format: xml\n")
    with pytest.raises(SettingError, match=r"services\.event_stores\[0\]\.format"):
        yamlfile.load(path)


def test_flags_build_the_sinks(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    values = _values("--output", "json", "--output-file", str(out), "--output-format", "qtap")
    sink = make_sink(values)
    assert isinstance(sink, QtapJsonSink)
    sink.close()
    values = _values(
        "--output", "json", "--output-file", str(out), "--output-max-bytes", "100",
        "--output-keep", "2",
    )  # fmt: skip
    assert (values["output_max_bytes"], values["output_keep"]) == (100, 2)
    sink = make_sink(values)
    assert type(sink) is JsonLinesSink and sink._rotation is not None
    assert sink._rotation.keep == 2
    sink.close()
    with pytest.raises(ValueError, match="give --output-file too"):
        make_sink(_values("--output-max-bytes", "100"))
