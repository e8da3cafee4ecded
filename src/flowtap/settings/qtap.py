"""Qtap's configuration format (version 2): the parts this build implements.

`stacks.<name>.plugins[]` with `http_capture` (`level`, `format`, `rules`), `access_logs`
(`mode`, `format`, `rules`), `http_metrics`, `report_usage` and `debug`; `tap.http.stack`,
`tap.direction`, `tap.ignore_loopback`, `tap.audit_include_dns`, `tags` (source env),
`rulekit.macros`, the `stdout` and `otel` event stores and the `stdout` and `s3` object
stores. Anything else Qtap knows is
refused by name (never ignored: a filter silently dropped would capture what the user meant
to exclude), and any other key gets a "did you mean".
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flowtap.records.access_log import MODE_LEVEL, MODES, AccessLogs, Format, Mode
from flowtap.records.http import CAPTURE_LEVELS, CaptureLevel
from flowtap.records.policy import CaptureRule, EndpointCapture
from flowtap.rules.evaluate import compile_rule
from flowtap.rules.fields import is_known
from flowtap.rules.syntax import RuleSyntaxError, compile_regex
from flowtap.settings.options import SettingError
from flowtap.sinks.objects import Secret
from flowtap.tracking.environment import MAX_TAGS, EnvTag, normalize
from flowtap.tracking.exe_filters import GROUPS, STRATEGIES, ExeFilter, Strategy, group_filters

TOP_LEVEL = ("version", "services", "stacks", "tap", "rulekit", "tags")
# SensorConfig fields that only the file sets: rules have no flag or variable.
FILE_ONLY = (
    "access_logs",
    "http_metrics",
    "report_usage",
    "debug_rules",
    "env_tags",
    "audit_include_dns",
    "http_rules",
    "rule_macros",
    "exe_filters",
    "http_endpoints",
    "s3_access_key",
    "s3_secret_key",
)
# Qtap's names for capture levels; `details` is Qtap's word for headers.
_LEVELS: dict[str, CaptureLevel] = {
    **{level: level for level in CAPTURE_LEVELS},
    "details": "headers",
}
_NOT_YET = "is part of Qtap's format but not in this build yet; remove it to run"


@dataclass(frozen=True, slots=True)
class QtapSettings:
    values: dict[str, Any]  # settings (SensorConfig fields) the file sets
    origins: dict[str, str]


def _did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class _Reader:
    def __init__(self, path: str, plain: Callable[[yaml.Node], Any]) -> None:
        self.path = path
        self.plain = plain

    def where(self, node: yaml.Node, dotted: str) -> str:
        return f"{self.path}:{node.start_mark.line + 1}: {dotted}"

    def mapping(
        self, node: yaml.Node, dotted: str, known: tuple[str, ...], later: tuple[str, ...] = ()
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise SettingError(f"{self.where(node, dotted)}: must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = str(self.plain(key_node))
            child = f"{dotted}.{key}" if dotted else key
            if key in later:
                raise SettingError(f"{self.where(key_node, child)}: {_NOT_YET}")
            if key not in known:
                hint = _did_you_mean(key, [*known, *later])
                raise SettingError(f"{self.where(key_node, child)}: unknown key{hint}")
            out[key] = (key_node, value_node)
        return out

    def sequence(self, node: yaml.Node, dotted: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise SettingError(f"{self.where(node, dotted)}: must be a list")
        return list(node.value)

    def string(self, node: yaml.Node, dotted: str) -> str:
        value = self.plain(node)
        if not isinstance(value, str):
            raise SettingError(f"{self.where(node, dotted)}: {value!r} is not text")
        return value

    def choice(self, node: yaml.Node, dotted: str, choices: tuple[str, ...]) -> str:
        value = self.string(node, dotted)
        if value not in choices:
            raise SettingError(
                f"{self.where(node, dotted)}: {value!r} is not one of {', '.join(sorted(choices))}"
            )
        return value


def load(path: str, root: yaml.MappingNode, plain: Callable[[yaml.Node], Any]) -> QtapSettings:
    """The Qtap sections of a file whose top-level mapping is `root`."""
    reader = _Reader(path, plain)
    sections = {
        str(plain(key)): (key, value) for key, value in root.value if plain(key) in TOP_LEVEL
    }
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if "version" in sections:
        _key, value = sections["version"]
        if plain(value) != 2:
            raise SettingError(
                f"{reader.where(value, 'version')}: {plain(value)!r}: this build reads version 2"
            )
    if "services" in sections:
        _services(reader, sections["services"][1], values, origins)
        _otel_store(reader, sections["services"][1], values, origins)
    macros: dict[str, str] = {}
    if "rulekit" in sections:
        macros = _macros(reader, sections["rulekit"][1])
    stacks: dict[str, tuple[yaml.Node, dict[str, Any]]] = {}
    if "stacks" in sections:
        stacks = _stacks(reader, sections["stacks"][1], macros)
    if "tap" in sections:
        _tap(reader, sections["tap"][1], stacks, values, origins)
    if macros:
        values["rule_macros"] = tuple(macros.items())
    if "tags" in sections:
        key_node, value = sections["tags"]
        values["env_tags"] = _tags(reader, value)
        origins["env_tags"] = reader.where(key_node, "tags")
    return QtapSettings(values, origins)


_TAG_SOURCES_LATER = ("k8s.label", "k8s.annotation", "container.label")


def _tags(reader: _Reader, node: yaml.Node) -> tuple[EnvTag, ...]:
    """Qtap's `tags`: [{key, source, location}]; a tag takes its value from where source
    says. `env`: the process's environment variable `location` (read once per process)."""
    tags: list[EnvTag] = []
    for index, item in enumerate(reader.sequence(node, "tags")):
        where = f"tags[{index}]"
        entry = reader.mapping(item, where, ("key", "source", "location"))
        missing = [k for k in ("key", "source", "location") if k not in entry]
        if missing:
            raise SettingError(f"{reader.where(item, where)}: a tag needs {', '.join(missing)}")
        source_node = entry["source"][1]
        source = reader.string(source_node, where + ".source")
        if source in _TAG_SOURCES_LATER:
            raise SettingError(
                f"{reader.where(source_node, where + '.source')}: {source}: flowtap reads "
                "no Kubernetes or container labels yet; use source env"
            )
        if source != "env":
            hint = _did_you_mean(source, ["env", *_TAG_SOURCES_LATER])
            raise SettingError(
                f"{reader.where(source_node, where + '.source')}: {source!r}: not a tag "
                f"source{hint}"
            )
        key = normalize(reader.string(entry["key"][1], where + ".key"))
        if not key:
            raise SettingError(f"{reader.where(entry['key'][1], where + '.key')}: an empty key")
        location = reader.string(entry["location"][1], where + ".location")
        if not location or "=" in location or "\0" in location:
            raise SettingError(
                f"{reader.where(entry['location'][1], where + '.location')}: "
                f"{location!r} is not an environment variable name"
            )
        tags.append(EnvTag(key, location))
    if len(tags) > MAX_TAGS:
        raise SettingError(f"{reader.where(node, 'tags')}: at most {MAX_TAGS} tags")
    return tuple(tags)


def _services(
    reader: _Reader, node: yaml.Node, values: dict[str, Any], origins: dict[str, str]
) -> None:
    fields = reader.mapping(node, "services", ("event_stores", "object_stores"))
    for name, (_key, value) in fields.items():
        for index, item in enumerate(reader.sequence(value, f"services.{name}")):
            dotted = f"services.{name}[{index}]"
            if name == "object_stores":
                _object_store(reader, item, dotted, values, origins)
                continue
            if name == "event_stores" and _store_type(reader, item) == "otel":
                continue  # read by _otel_store
            store = reader.mapping(item, dotted, ("type", "id", "format"))
            if "type" not in store:
                raise SettingError(f"{reader.where(item, dotted)}: needs a type")
            kind = reader.string(store["type"][1], f"{dotted}.type")
            if kind != "stdout":
                has = "stdout and otel stores" if name == "event_stores" else "stdout store"
                raise SettingError(
                    f"{reader.where(store['type'][1], dotted + '.type')}: {kind!r}: this build "
                    f"has the {has} only (use --output-file for a JSON-lines file)"
                )
            if "format" in store:  # the records' field names (sinks/qtap_format.py)
                node = store["format"][1]
                values["output_format"] = reader.choice(node, dotted + ".format", _FORMATS)
                origins["output_format"] = reader.where(node, dotted + ".format")


_S3_KEYS = ("endpoint", "bucket", "region", "insecure", "access_url")


def _object_store(
    reader: _Reader, item: yaml.Node, dotted: str, values: dict[str, Any], origins: dict[str, str]
) -> None:
    """`stdout` (bodies inline, the default) or `s3` (sinks/objects.py): one s3 store."""
    known = ("type", "id", *_S3_KEYS, "access_key", "secret_key")
    store = reader.mapping(item, dotted, known)
    if "type" not in store:
        raise SettingError(f"{reader.where(item, dotted)}: needs a type")
    kind = reader.choice(store["type"][1], f"{dotted}.type", ("stdout", "s3"))
    extra = sorted(set(store) - {"type", "id"})
    if kind == "stdout":
        if extra:
            raise SettingError(f"{reader.where(item, dotted)}: {extra[0]}: only for type s3")
        return
    if "s3_endpoint" in values:
        raise SettingError(f"{reader.where(item, dotted)}: this build takes one s3 object store")
    for key in ("endpoint", "bucket"):
        if key not in store:
            raise SettingError(f"{reader.where(item, dotted)}: an s3 store needs {key}")
    where = reader.where(item, dotted)
    for key in _S3_KEYS:
        if key not in store:
            continue
        node = store[key][1]
        if key == "insecure":
            flag = reader.plain(node)
            if not isinstance(flag, bool):
                raise SettingError(f"{reader.where(node, dotted + '.insecure')}: true or false")
            values["s3_insecure"] = flag
        else:
            values[f"s3_{key}"] = reader.string(node, f"{dotted}.{key}")
        origins[f"s3_{key}"] = f"{where}.{key}"
    for key in ("access_key", "secret_key"):
        if key in store:
            values[f"s3_{key}"] = _secret(reader, store[key][1], f"{dotted}.{key}")
            origins[f"s3_{key}"] = f"{where}.{key}"


def _secret(reader: _Reader, node: yaml.Node, dotted: str) -> Secret:
    """Qtap's value source: {type: env, value: NAME} or {type: text, value: ...}."""
    fields = reader.mapping(node, dotted, ("type", "value"))
    if "type" not in fields or "value" not in fields:
        raise SettingError(f"{reader.where(node, dotted)}: needs a type (env or text) and a value")
    kind = reader.choice(fields["type"][1], f"{dotted}.type", ("env", "text"))
    value = reader.string(fields["value"][1], f"{dotted}.value")
    return Secret(env=value) if kind == "env" else Secret(text=value)


def _store_type(reader: _Reader, item: yaml.Node) -> object:
    if not isinstance(item, yaml.MappingNode):
        return None
    return next((reader.plain(v) for k, v in item.value if reader.plain(k) == "type"), None)


_OTEL_KEYS = (
    "type",
    "id",
    "endpoint",
    "protocol",
    "headers",
    "service_name",
    "environment",
    "tls",
    "format",
)
_FORMATS = ("flowtap", "qtap")  # an event store's `format`: its records' field names


def _otel_store(
    reader: _Reader, node: yaml.Node, values: dict[str, Any], origins: dict[str, str]
) -> None:
    """`services.event_stores: - type: otel` as the --otel-* settings (sinks/otel.py).
    A header's value is text, or Qtap's {type: env, value: VARIABLE} for a secret kept
    out of the file; values are never echoed in messages."""
    fields = reader.mapping(node, "services", ("event_stores", "object_stores"))
    if "event_stores" not in fields:
        return
    stores = reader.sequence(fields["event_stores"][1], "services.event_stores")
    found = [(i, item) for i, item in enumerate(stores) if _store_type(reader, item) == "otel"]
    if len(found) > 1:
        where = reader.where(found[1][1], f"services.event_stores[{found[1][0]}]")
        raise SettingError(f"{where}: this build sends to one otel store; keep one")
    if not found:
        return
    index, item = found[0]
    dotted = f"services.event_stores[{index}]"
    store = reader.mapping(item, dotted, _OTEL_KEYS)
    if "endpoint" not in store:
        raise SettingError(f"{reader.where(item, dotted)}: an otel store needs an endpoint")

    def put(name: str, key: str, value: Any) -> None:
        values[name] = value
        origins[name] = reader.where(store[key][1], f"{dotted}.{key}")

    put("otel_endpoint", "endpoint", reader.string(store["endpoint"][1], dotted + ".endpoint"))
    if "protocol" in store:
        protocol = reader.choice(store["protocol"][1], dotted + ".protocol", ("grpc", "http"))
        put("otel_protocol", "protocol", protocol)
    if "format" in store:
        put(
            "otel_format", "format", reader.choice(store["format"][1], dotted + ".format", _FORMATS)
        )
    for key in ("service_name", "environment"):
        if key in store:
            put(f"otel_{key}", key, reader.string(store[key][1], f"{dotted}.{key}"))
    if "headers" in store:
        put("otel_headers", "headers", _otel_headers(reader, store["headers"][1], dotted))
    if "tls" in store:
        tls = reader.mapping(store["tls"][1], dotted + ".tls", ("insecure", "ca_file"))
        if "insecure" in tls:
            insecure = reader.plain(tls["insecure"][1])
            if not isinstance(insecure, bool):
                where = reader.where(tls["insecure"][1], dotted + ".tls.insecure")
                raise SettingError(f"{where}: must be true or false")
            put("otel_insecure", "tls", insecure)
        if "ca_file" in tls:
            ca_file = reader.string(tls["ca_file"][1], dotted + ".tls.ca_file")
            put("otel_ca_file", "tls", Path(ca_file))


def _otel_headers(reader: _Reader, node: yaml.Node, dotted: str) -> tuple[str, ...]:
    if not isinstance(node, yaml.MappingNode):
        raise SettingError(f"{reader.where(node, dotted + '.headers')}: must be a mapping")
    out: list[str] = []
    for key_node, value_node in node.value:
        key = str(reader.plain(key_node))
        child = f"{dotted}.headers.{key}"
        if isinstance(value_node, yaml.MappingNode):
            spec = reader.mapping(value_node, child, ("type", "value"))
            if "type" not in spec or "value" not in spec:
                raise SettingError(f"{reader.where(value_node, child)}: needs a type and a value")
            kind = reader.choice(spec["type"][1], child + ".type", ("text", "env"))
            text = reader.string(spec["value"][1], child + ".value")
            if kind == "env":
                if text not in os.environ:
                    raise SettingError(
                        f"{reader.where(value_node, child)}: the environment has no {text}; "
                        "set it in the sensor's environment"
                    )
                text = os.environ[text]
        else:
            text = reader.string(value_node, child)
        out.append(f"{key}={text}")
    return tuple(out)


def _macros(reader: _Reader, node: yaml.Node) -> dict[str, str]:
    fields = reader.mapping(node, "rulekit", ("macros",))
    macros: dict[str, str] = {}
    if "macros" not in fields:
        return macros
    for index, item in enumerate(reader.sequence(fields["macros"][1], "rulekit.macros")):
        dotted = f"rulekit.macros[{index}]"
        entry = reader.mapping(item, dotted, ("name", "expr"))
        if "name" not in entry or "expr" not in entry:
            raise SettingError(f"{reader.where(item, dotted)}: a macro needs a name and an expr")
        macros[reader.string(entry["name"][1], dotted + ".name")] = reader.string(
            entry["expr"][1], dotted + ".expr"
        )
    for index, item in enumerate(reader.sequence(fields["macros"][1], "rulekit.macros")):
        dotted = f"rulekit.macros[{index}].expr"
        expr_node = reader.mapping(item, dotted, ("name", "expr"))["expr"][1]
        _check_rule(reader, expr_node, dotted, reader.string(expr_node, dotted), macros)
    return macros


def _check_rule(
    reader: _Reader, node: yaml.Node, dotted: str, expr: str, macros: dict[str, str]
) -> None:
    try:
        compile_rule(expr, macros, known_fields=is_known)
    except RuleSyntaxError as error:
        pointer = error.pointer().replace("\n", "\n  ")
        raise SettingError(f"{reader.where(node, dotted)}: {error}\n  {pointer}") from None


PLUGINS = ("http_capture", "access_logs", "http_metrics", "report_usage", "debug")
# A stack's settings before its plugins are read: no http_capture, no other plugin.
_EMPTY_STACK: dict[str, Any] = {
    "capture_level": "none",
    "http_rules": (),
    "access_logs": None,
    "http_metrics": False,
    "report_usage": False,
    "debug_rules": False,
}


def _stacks(
    reader: _Reader, node: yaml.Node, macros: dict[str, str]
) -> dict[str, tuple[yaml.Node, dict[str, Any]]]:
    if not isinstance(node, yaml.MappingNode):
        raise SettingError(f"{reader.where(node, 'stacks')}: must be a mapping of stacks")
    stacks: dict[str, tuple[yaml.Node, dict[str, Any]]] = {}
    for key_node, stack_node in node.value:
        name = str(reader.plain(key_node))
        dotted = f"stacks.{name}"
        fields = reader.mapping(stack_node, dotted, ("plugins",))
        capture: dict[str, Any] = dict(_EMPTY_STACK)
        seen: set[str] = set()
        for index, item in enumerate(
            reader.sequence(fields["plugins"][1], dotted + ".plugins")
            if "plugins" in fields
            else []
        ):
            where = f"{dotted}.plugins[{index}]"
            plugin = reader.mapping(item, where, ("type", "config"))
            if "type" not in plugin:
                raise SettingError(f"{reader.where(item, where)}: needs a type")
            kind_node = plugin["type"][1]
            kind = reader.string(kind_node, where + ".type")
            if kind not in PLUGINS:
                hint = _did_you_mean(kind, list(PLUGINS))
                raise SettingError(
                    f"{reader.where(kind_node, where + '.type')}: {kind!r}: not a plugin{hint}"
                )
            if kind in seen:
                raise SettingError(
                    f"{reader.where(kind_node, where + '.type')}: a second {kind} in the stack"
                )
            seen.add(kind)
            config = plugin["config"][1] if "config" in plugin else None
            capture.update(_plugin(reader, kind, config, where + ".config", macros))
        stacks[name] = (key_node, capture)
    return stacks


def _plugin(
    reader: _Reader, kind: str, node: yaml.Node | None, dotted: str, macros: dict[str, str]
) -> dict[str, Any]:
    """One plugin's settings (SensorConfig fields)."""
    if kind == "http_capture":
        if node is None:
            return {"capture_level": "summary", "http_rules": ()}
        return _http_capture(reader, node, dotted, macros)
    if kind == "access_logs":
        return {"access_logs": _access_logs(reader, node, dotted, macros)}
    # http_metrics, report_usage and debug take no settings in Qtap's format.
    if node is not None and reader.plain(node) not in (None, {}):
        raise SettingError(f"{reader.where(node, dotted)}: {kind} takes no config")
    setting = {"http_metrics": "http_metrics", "report_usage": "report_usage"}.get(kind)
    return {setting or "debug_rules": True}


def _access_logs(
    reader: _Reader, node: yaml.Node | None, dotted: str, macros: dict[str, str]
) -> AccessLogs:
    """Qtap's access_logs: mode (default summary), format (default console), rules."""
    if node is None:
        return AccessLogs()
    fields = reader.mapping(node, dotted, ("mode", "format", "rules"))
    mode: Mode = "summary"
    fmt: Format = "console"
    if "mode" in fields:
        mode = reader.choice(fields["mode"][1], dotted + ".mode", MODES)  # type: ignore[assignment]
    if "format" in fields:
        fmt = reader.choice(  # type: ignore[assignment]
            fields["format"][1], dotted + ".format", ("console", "json")
        )
    rules: list[CaptureRule] = []
    if "rules" in fields:
        rules = _rules(
            reader, fields["rules"][1], dotted, macros, key="mode", levels=dict(MODE_LEVEL)
        )
    return AccessLogs(mode, fmt, tuple(rules))


def _rules(
    reader: _Reader,
    node: yaml.Node,
    dotted: str,
    macros: dict[str, str],
    *,
    key: str,
    levels: dict[str, CaptureLevel],
) -> list[CaptureRule]:
    """A plugin's `rules`: each an expr and, under `key`, one of levels (first match wins)."""
    rules: list[CaptureRule] = []
    for index, item in enumerate(reader.sequence(node, dotted + ".rules")):
        where = f"{dotted}.rules[{index}]"
        rule = reader.mapping(item, where, ("name", "expr", key))
        if "expr" not in rule or key not in rule:
            raise SettingError(f"{reader.where(item, where)}: a rule needs an expr and a {key}")
        expr_node = rule["expr"][1]
        expr = reader.string(expr_node, where + ".expr")
        _check_rule(reader, expr_node, where + ".expr", expr, macros)
        chosen = reader.choice(rule[key][1], f"{where}.{key}", tuple(levels))
        name = reader.string(rule["name"][1], where + ".name") if "name" in rule else expr
        origin = f"{reader.path}:{expr_node.start_mark.line + 1}"
        rules.append(CaptureRule(name, expr, levels[chosen], origin))
    return rules


def _http_capture(
    reader: _Reader, node: yaml.Node, dotted: str, macros: dict[str, str]
) -> dict[str, Any]:
    fields = reader.mapping(node, dotted, ("level", "format", "rules"))
    out: dict[str, Any] = {"capture_level": "summary", "http_rules": ()}
    if "level" in fields:
        level = reader.choice(fields["level"][1], dotted + ".level", tuple(_LEVELS))
        out["capture_level"] = _LEVELS[level]
    if "format" in fields:  # the records' format: Qtap's text is flowtap's console output
        chosen = reader.choice(fields["format"][1], dotted + ".format", ("json", "text"))
        out["output"] = "json" if chosen == "json" else "console"
    rules: list[CaptureRule] = []
    if "rules" in fields:
        rules = _rules(
            reader, fields["rules"][1], dotted, macros, key="level", levels=dict(_LEVELS)
        )
    out["http_rules"] = tuple(rules)
    return out


def _stack_named(
    reader: _Reader,
    node: yaml.Node,
    dotted: str,
    stacks: dict[str, tuple[yaml.Node, dict[str, Any]]],
) -> dict[str, Any]:
    name = reader.string(node, dotted)
    if name not in stacks:
        hint = _did_you_mean(name, list(stacks))
        raise SettingError(f"{reader.where(node, dotted)}: no stack named {name!r}{hint}")
    return stacks[name][1]


def _endpoints(
    reader: _Reader,
    node: yaml.Node,
    stacks: dict[str, tuple[yaml.Node, dict[str, Any]]],
    formats: list[tuple[str, str]],
) -> tuple[EndpointCapture, ...]:
    endpoints: list[EndpointCapture] = []
    for index, item in enumerate(reader.sequence(node, "tap.endpoints")):
        where = f"tap.endpoints[{index}]"
        entry = reader.mapping(item, where, ("domain", "http"))
        if "domain" not in entry or "http" not in entry:
            raise SettingError(f"{reader.where(item, where)}: an endpoint needs a domain and http")
        domain = reader.string(entry["domain"][1], where + ".domain")
        http = reader.mapping(entry["http"][1], where + ".http", ("stack",))
        if "stack" not in http:
            raise SettingError(f"{reader.where(entry['http'][1], where)}.http: needs a stack")
        capture = _stack_named(reader, http["stack"][1], where + ".http.stack", stacks)
        if "output" in capture:  # records have one format: the tap.http.stack's
            formats.append((capture["output"], reader.where(http["stack"][1], where)))
        endpoints.append(
            EndpointCapture(
                domain,
                capture.get("capture_level", "none"),
                capture.get("http_rules", ()),
                capture.get("access_logs"),
            )
        )
    return tuple(endpoints)


def _filters(reader: _Reader, node: yaml.Node) -> tuple[ExeFilter, ...]:
    fields = reader.mapping(node, "tap.filters", ("groups", "custom"))
    filters: list[ExeFilter] = []
    if "groups" in fields:
        for index, item in enumerate(reader.sequence(fields["groups"][1], "tap.filters.groups")):
            name = reader.choice(item, f"tap.filters.groups[{index}]", tuple(GROUPS))
            filters.extend(group_filters(name))
    if "custom" in fields:
        for index, item in enumerate(reader.sequence(fields["custom"][1], "tap.filters.custom")):
            where = f"tap.filters.custom[{index}]"
            entry = reader.mapping(item, where, ("exe", "strategy", "only"))
            if "exe" not in entry:
                raise SettingError(f"{reader.where(item, where)}: needs an exe")
            exe = reader.string(entry["exe"][1], where + ".exe")
            strategy: Strategy = "exact"
            if "strategy" in entry:
                strategy = reader.choice(  # type: ignore[assignment]
                    entry["strategy"][1], where + ".strategy", STRATEGIES
                )
            only = False
            if "only" in entry:
                flag = reader.plain(entry["only"][1])
                if not isinstance(flag, bool):
                    raise SettingError(
                        f"{reader.where(entry['only'][1], where)}.only: not true or false"
                    )
                only = flag
            pattern = None
            if strategy == "regex":
                try:
                    pattern = compile_regex(exe, 0, exe)
                except RuleSyntaxError as error:
                    raise SettingError(
                        f"{reader.where(entry['exe'][1], where + '.exe')}: {error.message}"
                    ) from None
            filters.append(ExeFilter(exe, strategy, only, pattern))
    return tuple(filters)


_DIRECTIONS = ("all", "egress", "egress-external", "egress-internal", "ingress")


def _tap(
    reader: _Reader,
    node: yaml.Node,
    stacks: dict[str, tuple[yaml.Node, dict[str, Any]]],
    values: dict[str, Any],
    origins: dict[str, str],
) -> None:
    fields = reader.mapping(
        node,
        "tap",
        ("direction", "ignore_loopback", "audit_include_dns", "http", "filters", "endpoints"),
    )
    # Qtap's default is false (a Go zero value): a file with a tap section and no
    # audit_include_dns gets no DNS flow records, as Qtap would give none.
    values["audit_include_dns"] = False
    origins["audit_include_dns"] = reader.where(node, "tap")
    if "audit_include_dns" in fields:
        value = fields["audit_include_dns"][1]
        flag = reader.plain(value)
        if not isinstance(flag, bool):
            raise SettingError(f"{reader.where(value, 'tap.audit_include_dns')}: not true or false")
        values["audit_include_dns"] = flag
        origins["audit_include_dns"] = reader.where(value, "tap.audit_include_dns")
    formats: list[tuple[str, str]] = []
    if "endpoints" in fields:
        key_node, value = fields["endpoints"]
        values["http_endpoints"] = _endpoints(reader, value, stacks, formats)
        origins["http_endpoints"] = reader.where(key_node, "tap.endpoints")
    if "filters" in fields:
        key_node, value = fields["filters"]
        values["exe_filters"] = _filters(reader, value)
        origins["exe_filters"] = reader.where(key_node, "tap.filters")
    if "direction" in fields:
        value = fields["direction"][1]
        values["direction"] = reader.choice(value, "tap.direction", _DIRECTIONS)
        origins["direction"] = reader.where(value, "tap.direction")
    if "ignore_loopback" in fields:
        value = fields["ignore_loopback"][1]
        flag = reader.plain(value)
        if not isinstance(flag, bool):
            raise SettingError(f"{reader.where(value, 'tap.ignore_loopback')}: not true or false")
        values["include_loopback"] = not flag
        origins["include_loopback"] = reader.where(value, "tap.ignore_loopback")
    if "http" in fields:
        http = reader.mapping(fields["http"][1], "tap.http", ("stack",))
        if "stack" in http:
            value = http["stack"][1]
            capture = _stack_named(reader, value, "tap.http.stack", stacks)
            where = reader.where(value, "tap.http.stack")
            for setting, setting_value in capture.items():
                values[setting] = setting_value
                origins[setting] = where
    chosen = values.get("output", "console")
    for output, where in formats:
        if output != chosen:
            theirs, ours = ("json", "text") if output == "json" else ("text", "json")
            raise SettingError(
                f"{where}.http.stack: its http_capture format is {theirs}, the tap.http.stack's "
                f"is {ours}: flowtap writes one format; make them the same"
            )
