"""Rules compiled once into Python closures, evaluated per transaction.

A field the transaction does not have makes any comparison that uses it false (never an
exception), so `http.res.status >= 500` is false for a request that got no response.
Macros (`rulekit.macros`) are expanded at compile time; a macro that calls itself is an
error, not a recursion at run time.
"""

from __future__ import annotations

import ipaddress
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from flowtap.rules.syntax import (
    And,
    Call,
    Compare,
    Constant,
    Field,
    Node,
    Not,
    Or,
    RuleSyntaxError,
    parse,
)

MAX_SUBJECT_CHARS = 8192  # regexes see at most this much of a value
MISSING = object()


class Fields(Protocol):
    """What rules read: `lookup` gives a field's value, or MISSING."""

    def lookup(self, name: str) -> object: ...


class FieldMap:
    """Fields from a plain mapping (tests, tools)."""

    def __init__(self, values: Mapping[str, object]) -> None:
        self._values = values

    def lookup(self, name: str) -> object:
        return self._values.get(name, MISSING)


Value = Callable[[Fields], object]
Predicate = Callable[[Fields], bool]

_FUNCTIONS = ("in_zone", "starts_with", "ends_with", "contains")


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: `matches(fields)` is its verdict for one transaction."""

    text: str
    matches: Predicate
    fields: frozenset[str]  # the fields it reads, for `validate` to check names


def compile_rule(
    text: str,
    macros: Mapping[str, str] | None = None,
    known_fields: Callable[[str], bool] | None = None,
) -> Rule:
    compiler = _Compiler(text, macros or {}, known_fields)
    return Rule(text, compiler.predicate(parse(text)), frozenset(compiler.fields))


class _Compiler:
    def __init__(
        self, text: str, macros: Mapping[str, str], known_fields: Callable[[str], bool] | None
    ) -> None:
        self.text = text
        self.macros = macros
        self.known_fields = known_fields
        self.fields: set[str] = set()
        self.expanding: list[str] = []

    def predicate(self, node: Node) -> Predicate:
        if isinstance(node, Or):
            parts = tuple(self.predicate(op) for op in node.operands)

            def any_of(f: Fields) -> bool:
                for part in parts:  # noqa: SIM110 (no generator per call: a hot path)
                    if part(f):
                        return True
                return False

            return any_of
        if isinstance(node, And):
            parts = tuple(self.predicate(op) for op in node.operands)

            def all_of(f: Fields) -> bool:
                for part in parts:  # noqa: SIM110 (no generator per call: a hot path)
                    if not part(f):
                        return False
                return True

            return all_of
        if isinstance(node, Not):
            inner = self.predicate(node.operand)
            return lambda f: not inner(f)
        if isinstance(node, Compare):
            return self.compare(node)
        if isinstance(node, Call):
            return self.call(node)
        value = self.value(node)
        return lambda f: _truthy(value(f))

    def value(self, node: Node) -> Value:
        if isinstance(node, Field):
            name = node.name.lower()
            if self.known_fields is not None and not self.known_fields(name):
                raise RuleSyntaxError(f"unknown field {node.name!r}", node.column, self.text)
            self.fields.add(name)
            return lambda f: f.lookup(name)
        if isinstance(node, Constant):
            constant = node.value
            return lambda f: constant
        return self.predicate(node)

    def compare(self, node: Compare) -> Predicate:
        left, right = self.value(node.left), self.value(node.right)
        test = _COMPARATORS[node.op]
        if node.op == "matches" and not (
            isinstance(node.right, Constant) and isinstance(node.right.value, re.Pattern)
        ):
            raise RuleSyntaxError("'matches' takes a /regular expression/", node.column, self.text)
        fast = self._field_against_constant(node, test)
        return fast if fast is not None else _binary(test, left, right)

    def _field_against_constant(
        self, node: Compare, test: Callable[[object, object], bool]
    ) -> Predicate | None:
        """`field OP constant`, the common shape: one lookup, and for a text or a whole
        number of the constant's own type the comparison inline (the general path
        converts and guards)."""
        if not (isinstance(node.left, Field) and isinstance(node.right, Constant)):
            return None
        name = node.left.name.lower()
        constant = node.right.value
        op = _INLINE.get(node.op) if type(constant) in (str, int) else None

        def compare(f: Fields) -> bool:
            value = f.lookup(name)
            if value.__class__ is constant.__class__ and op is not None:
                return op(value, constant)
            if value is MISSING or value is None:
                return False
            try:
                return test(value, constant)
            except (TypeError, ValueError):
                return False

        return compare

    def call(self, node: Call) -> Predicate:
        name = node.name.lower()
        if name in self.macros and not node.args:
            if name in self.expanding:
                chain = " -> ".join([*self.expanding, name])
                raise RuleSyntaxError(f"macro calls itself: {chain}", node.column, self.text)
            try:
                tree = parse(self.macros[name])
            except RuleSyntaxError as error:
                raise RuleSyntaxError(
                    f"in macro {name!r}: {error}", node.column, self.text
                ) from None
            self.expanding.append(name)
            try:
                return self.predicate(tree)
            finally:
                self.expanding.pop()
        if name in _FUNCTIONS:
            if len(node.args) != 2:
                raise RuleSyntaxError(f"{name}() takes two arguments", node.column, self.text)
            first, second = (self.value(arg) for arg in node.args)
            return _binary(_zone if name == "in_zone" else _COMPARATORS[name], first, second)
        known = sorted({*self.macros, *_FUNCTIONS})
        raise RuleSyntaxError(
            f"unknown macro or function {node.name!r} (known: {', '.join(known)})",
            node.column,
            self.text,
        )


def _binary(test: Callable[[object, object], bool], left: Value, right: Value) -> Predicate:
    """test on two values; a missing one, or values of kinds that do not compare, is no
    match (never an exception)."""

    def binary(f: Fields) -> bool:
        a, b = left(f), right(f)
        if a is MISSING or b is MISSING or a is None or b is None:
            return False
        try:
            return test(a, b)
        except (TypeError, ValueError):
            return False

    return binary


def _truthy(value: object) -> bool:
    return value is not MISSING and value is not None and bool(value)


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        return float(value)
    raise TypeError


def _equal(a: object, b: object) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address)) or isinstance(
        b, (ipaddress.IPv4Address, ipaddress.IPv6Address)
    ):
        return ipaddress.ip_address(str(a)) == ipaddress.ip_address(str(b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or str(a).lower() == str(b).lower()
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return _number(a) == _number(b)
    return a == b


def _in(a: object, b: object) -> bool:
    if isinstance(b, tuple):
        return any(_in(a, item) if _is_network(item) else _safe_equal(a, item) for item in b)
    if _is_network(b):
        return ipaddress.ip_address(str(a)) in b  # type: ignore[operator]
    if isinstance(b, str):
        return str(a) in b
    if isinstance(b, (list, set, frozenset)):
        return any(_safe_equal(a, item) for item in b)
    return False


def _safe_equal(a: object, b: object) -> bool:
    try:
        return _equal(a, b)
    except (TypeError, ValueError):
        return False


def _is_network(value: object) -> bool:
    return isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network))


def _contains(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)):
        return any(_safe_equal(item, b) for item in a)
    if _is_network(a):
        return ipaddress.ip_address(str(b)) in a  # type: ignore[operator]
    return str(b) in str(a)


def _matches(a: object, b: object) -> bool:
    assert isinstance(b, re.Pattern)
    return b.search(str(a)[:MAX_SUBJECT_CHARS]) is not None


def _zone(domain: object, zone: object) -> bool:
    """`domain` is `zone` or a name under it (case and a trailing dot ignored)."""
    name, suffix = str(domain).lower().rstrip("."), str(zone).lower().strip(".")
    return name == suffix or name.endswith("." + suffix)


_COMPARATORS: dict[str, Callable[[object, object], bool]] = {
    "==": _equal,
    "!=": lambda a, b: not _equal(a, b),
    "<": lambda a, b: _number(a) < _number(b),
    "<=": lambda a, b: _number(a) <= _number(b),
    ">": lambda a, b: _number(a) > _number(b),
    ">=": lambda a, b: _number(a) >= _number(b),
    "contains": _contains,
    "in": _in,
    "matches": _matches,
    "starts_with": lambda a, b: str(a).startswith(str(b)),
    "ends_with": lambda a, b: str(a).endswith(str(b)),
}
# Comparisons of two values of one type (text with text, int with int) need no conversion.
_INLINE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
