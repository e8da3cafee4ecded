"""The YAML configuration file: its `flowtap:` section holds the settings (each at the YAML
path of its declaration). Values keep their line, so errors read `file:line: path: ...`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from flowtap.settings import qtap
from flowtap.settings.options import BY_NAME, SettingError, parse_yaml

MAX_BYTES = 1 << 20  # a configuration file is small; a huge one is a mistake or an attack
MAX_NODES = 100_000  # anchors and aliases can make a small file expand without bound


def _did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _plain(node: yaml.Node, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise SettingError(f"more than {MAX_NODES} values (aliases expanding?)")
    if isinstance(node, yaml.MappingNode):
        return {_plain(key, budget): _plain(value, budget) for key, value in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, budget) for item in node.value]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    return loader.construct_object(node, deep=True)


def load(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(setting -> value, setting -> "file:line: flowtap.name") from the file's
    `flowtap:` section. Raises SettingError naming the file and line."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SettingError(
                f"{path}: {size} bytes: a configuration file is at most {MAX_BYTES} bytes"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingError(f"{path}: not UTF-8 text") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f"{mark.line + 1}" if mark is not None else "?"
        raise SettingError(f"{path}:{line}: not valid YAML: {exc.problem}") from None
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if root is None:
        return values, origins
    if not isinstance(root, yaml.MappingNode):
        raise SettingError(f"{path}:{root.start_mark.line + 1}: the file must be a mapping")
    budget = [MAX_NODES]
    sections = ["flowtap", *qtap.TOP_LEVEL]
    for key_node, value_node in root.value:
        key = _scalar(key_node)
        where = f"{path}:{key_node.start_mark.line + 1}"
        if key in qtap.TOP_LEVEL:
            continue  # Qtap's sections, read below
        if key != "flowtap":
            raise SettingError(
                f"{where}: {key}: not a known section{_did_you_mean(str(key), sections)}"
            )
        if not isinstance(value_node, yaml.MappingNode):
            raise SettingError(f"{where}: flowtap: must be a mapping of settings")
        known = sorted(name for name, option in BY_NAME.items() if option.in_config)
        for name_node, setting_node in value_node.value:
            name = _scalar(name_node)
            line = f"{path}:{name_node.start_mark.line + 1}: flowtap.{name}"
            option = BY_NAME.get(name) if isinstance(name, str) else None
            if option is None or not option.in_config:
                raise SettingError(f"{line}: not a setting{_did_you_mean(str(name), known)}")
            try:
                values[name] = parse_yaml(option, _plain(setting_node, budget))
            except SettingError as exc:
                raise SettingError(f"{line}: {exc}") from None
            origins[name] = line
    from_qtap = qtap.load(str(path), root, lambda node: _plain(node, budget))
    for name, value in from_qtap.values.items():
        if name in origins:  # the flowtap: section wins over Qtap's equivalent
            continue
        values[name] = value
        origins[name] = from_qtap.origins.get(name, f"{path}")
    return values, origins
