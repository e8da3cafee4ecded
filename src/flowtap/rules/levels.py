"""Per-transaction capture levels chosen by rules, first match wins (as in Qtap)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from flowtap.rules.evaluate import Fields, Rule, compile_rule
from flowtap.rules.fields import is_known

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NamedRule(Generic[T]):
    name: str
    rule: Rule
    outcome: T  # what the rule picks: a capture level, a format, ...


@dataclass(frozen=True, slots=True)
class FirstMatch(Generic[T]):
    """Rules in order and the outcome when none matches."""

    rules: tuple[NamedRule[T], ...]
    default: T

    def default_and_outcomes(self) -> list[T]:
        return [self.default, *(named.outcome for named in self.rules)]

    def choose(self, fields: Fields) -> tuple[T, str | None]:
        """The outcome and the name of the rule that chose it (None: the default)."""
        for named in self.rules:
            if named.rule.matches(fields):
                return named.outcome, named.name
        return self.default, None


def compile_rules(
    rules: Sequence[tuple[str, str, T]], default: T, macros: Mapping[str, str] | None = None
) -> FirstMatch[T]:
    """(name, expression, outcome) triples compiled once, unknown field names refused."""
    return FirstMatch(
        tuple(
            NamedRule(name, compile_rule(expr, macros, known_fields=is_known), outcome)
            for name, expr, outcome in rules
        ),
        default,
    )
