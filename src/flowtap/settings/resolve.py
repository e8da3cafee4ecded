"""Precedence: defaults < environment < flags actually given. Each value remembers where it
came from, so that an error can name the flag or the variable the user set."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowtap.settings import yamlfile
from flowtap.settings.options import (
    OPTIONS,
    Option,
    SettingError,
    argparse_type,
    parse_text,
)


def add_flags(parser: argparse.ArgumentParser, *, given_only: bool = False) -> None:
    """The run command's flags, from the declaration. given_only: no defaults, so that the
    namespace holds only the flags on the command line."""
    groups: dict[str, Any] = {}
    for option in OPTIONS:
        if option.flag is None:
            continue
        target = parser
        if option.group != "run":
            if option.group not in groups:
                groups[option.group] = parser.add_argument_group(option.group)
            target = groups[option.group]
        names = ["-v", option.flag] if option.name == "verbose" else [option.flag]
        default = argparse.SUPPRESS if given_only else _flag_default(option)
        help_text = argparse.SUPPRESS if option.hidden else option.help
        if option.kind == "bool":
            action = "store_false" if option.negate else "store_true"
            target.add_argument(
                *names, dest=option.dest, action=action, default=default, help=help_text
            )
        elif option.kind in ("ints", "strs", "paths"):
            target.add_argument(
                *names,
                dest=option.dest,
                action="append",
                type=argparse_type(option),
                default=default,
                metavar=option.metavar,
                help=help_text,
            )
        elif option.kind == "onoff":
            target.add_argument(
                *names, dest=option.dest, choices=("on", "off"), default=default, help=help_text
            )
        elif option.kind == "csv":
            target.add_argument(
                *names, dest=option.dest, default=default, metavar=option.metavar, help=help_text
            )
        else:
            target.add_argument(
                *names,
                dest=option.dest,
                choices=option.choices,
                type=str if option.choices else argparse_type(option),
                default=default,
                metavar=option.metavar,
                help=help_text,
            )


def _flag_default(option: Option) -> Any:
    """The namespace value a flag has when not given (as the command line always had it)."""
    if option.kind in ("ints", "strs", "paths"):
        return []
    if option.kind == "csv":
        return ",".join(option.default)
    if option.kind == "onoff":
        return "on" if option.default else "off"
    if option.kind == "bool":
        return option.default
    return option.default


def _flag_value(option: Option, raw: Any) -> Any:
    if option.kind in ("ints", "strs", "paths"):
        return tuple(raw)
    if option.kind == "csv":
        return parse_text(option, raw)
    if option.kind == "onoff":
        return raw == "on"
    return raw


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """(value of each setting, where each non-default came from: "--flag" or "$VAR").
    A flag counts as given when the namespace has it and (for a parser with defaults) it
    differs from the flag's default."""
    values: dict[str, Any] = {option.name: option.default for option in OPTIONS}
    origins: dict[str, str] = {}
    config_path = config_file(args, environ)
    if config_path is not None:
        from_file, file_origins = yamlfile.load(config_path)
        values.update(from_file)
        origins.update(file_origins)
    for option in OPTIONS:
        text = environ.get(option.env_name)
        if text is not None and text != "":
            try:
                values[option.name] = parse_text(option, text)
            except SettingError as exc:
                raise SettingError(f"${option.env_name}: {exc}") from None
            origins[option.name] = f"${option.env_name}"
        if option.flag is None or not hasattr(args, option.dest):
            continue
        raw = getattr(args, option.dest)
        if raw == _flag_default(option) and not _given(args, option):
            continue  # the parser's default: not given
        values[option.name] = _flag_value(option, raw)
        origins[option.name] = option.flag
    return values, origins


def config_file(args: argparse.Namespace, environ: Mapping[str, str]) -> Path | None:
    """--config, else $QPOINT_CONFIG: the file is read before the other sources apply."""
    flag = getattr(args, "config", None)
    if flag is not None:
        return Path(flag)
    text = environ.get("QPOINT_CONFIG")
    return Path(text) if text else None


def _given(args: argparse.Namespace, option: Option) -> bool:
    """For a parser built with given_only, presence means given."""
    return bool(getattr(args, "_given_only", False))
