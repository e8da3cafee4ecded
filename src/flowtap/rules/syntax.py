"""Rule expressions in Qtap's rule language (rulekit): tokens, grammar and syntax tree.

    expr    := or
    or      := and (("or" | "||") and)*
    and     := not (("and" | "&&") not)*
    not     := ("not" | "!") not | compare
    compare := operand (OP operand)?
    operand := "(" expr ")" | "[" literal ("," literal)* "]" | call | field | literal
    call    := NAME "(" (operand ("," operand)*)? ")"

A field alone is true when it is present and not zero or empty, as in rulekit.
Every error carries the 0-based column it was found at.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

MAX_RULE_CHARS = 4096  # a rule is a line of configuration, not a program
MAX_DEPTH = 64  # nesting of parentheses and `not`

Comparator = Literal[
    "==", "!=", "<", "<=", ">", ">=", "contains", "in", "matches", "starts_with", "ends_with"
]
_WORD_OPERATORS: dict[str, Comparator] = {
    "eq": "==",
    "ne": "!=",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "contains": "contains",
    "in": "in",
    "matches": "matches",
    "starts_with": "starts_with",
    "ends_with": "ends_with",
}
_SYMBOL_OPERATORS: tuple[str, ...] = ("==", "!=", "<=", ">=", "&&", "||", "<", ">", "!")


class RuleSyntaxError(ValueError):
    """A rule that does not parse; `column` is where the parser stopped (0-based)."""

    def __init__(self, message: str, column: int, text: str) -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.text = text

    def __str__(self) -> str:
        return f"column {self.column + 1}: {self.message}"

    def pointer(self) -> str:
        """The rule with a caret under the place of the error."""
        return f"{self.text}\n{' ' * self.column}^"


# --- syntax tree ---------------------------------------------------------------------------

Scalar = str | int | float | bool | ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Constant:
    value: Scalar | Network | re.Pattern[str] | tuple[Scalar | Network, ...]
    column: int


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    column: int


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Node, ...]
    column: int


@dataclass(frozen=True, slots=True)
class Compare:
    op: Comparator
    left: Node
    right: Node
    column: int


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]


Node = Constant | Field | Call | Compare | Not | And | Or


# --- tokens --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    kind: Literal["word", "string", "regex", "symbol", "end"]
    text: str
    column: int
    value: object = None


_WORD = re.compile(r"[A-Za-z0-9_.:/\-]+")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_RULE_CHARS:
        raise RuleSyntaxError(f"rule longer than {MAX_RULE_CHARS} characters", 0, text[:80])
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == '"':
            value, end = _string(text, i)
            tokens.append(Token("string", text[i:end], i, value))
            i = end
        elif ch == "/" and _regex_allowed(tokens):
            value, end = _regex(text, i)
            tokens.append(Token("regex", text[i:end], i, value))
            i = end
        elif ch in "()[],":
            tokens.append(Token("symbol", ch, i))
            i += 1
        elif (symbol := _symbol_at(text, i)) is not None:
            tokens.append(Token("symbol", symbol, i))
            i += len(symbol)
        elif match := _WORD.match(text, i):
            tokens.append(Token("word", match.group(), i))
            i = match.end()
        else:
            raise RuleSyntaxError(f"unexpected character {ch!r}", i, text)
    tokens.append(Token("end", "", len(text)))
    return tokens


def _symbol_at(text: str, i: int) -> str | None:
    for symbol in _SYMBOL_OPERATORS:
        if text.startswith(symbol, i):
            return symbol
    return None


def _regex_allowed(tokens: list[Token]) -> bool:
    """A slash opens a regex where a value is expected: after an operator, `(`, `[` or `,`."""
    if not tokens:
        return True
    last = tokens[-1]
    return last.kind == "symbol" or (last.kind == "word" and last.text.lower() in _WORD_OPERATORS)


def _string(text: str, start: int) -> tuple[str, int]:
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise RuleSyntaxError("string without its closing quote", start, text)


def _regex(text: str, start: int) -> tuple[str, int]:
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == "/":
            return text[start + 1 : i], i + 1
        else:
            i += 1
    raise RuleSyntaxError("regular expression without its closing /", start, text)


# --- parser --------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.depth = 0

    def error(self, message: str, token: Token | None = None) -> RuleSyntaxError:
        return RuleSyntaxError(message, (token or self.peek()).column, self.text)

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def advance(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def accept(self, *texts: str) -> Token | None:
        token = self.peek()
        if token.kind in ("symbol", "word") and token.text.lower() in texts:
            return self.advance()
        return None

    def expect(self, text: str) -> Token:
        token = self.accept(text)
        if token is None:
            found = self.peek().text or "the end of the rule"
            raise self.error(f"expected {text!r}, found {found!r}")
        return token

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.error("empty rule")
        node = self.parse_or()
        if self.peek().kind != "end":
            raise self.error(f"unexpected {self.peek().text!r} (missing 'and' or 'or'?)")
        return node

    def parse_or(self) -> Node:
        operands = [self.parse_and()]
        while self.accept("or", "||"):
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def parse_and(self) -> Node:
        operands = [self.parse_not()]
        while self.accept("and", "&&"):
            operands.append(self.parse_not())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def parse_not(self) -> Node:
        if opening := self.accept("not", "!"):
            self.enter(opening)
            node = Not(self.parse_not())
            self.depth -= 1
            return node
        return self.parse_compare()

    def enter(self, opening: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep", opening)

    def parse_compare(self) -> Node:
        left = self.parse_operand()
        token = self.peek()
        op = _comparator(token)
        if op is None:
            return left
        self.advance()
        right = self.parse_operand()
        return Compare(op, left, right, token.column)

    def parse_operand(self) -> Node:
        token = self.peek()
        if self.accept("("):
            self.enter(token)
            node = self.parse_or()
            self.expect(")")
            self.depth -= 1
            return node
        if self.accept("["):
            return self.parse_list(token)
        if token.kind == "string":
            self.advance()
            return Constant(str(token.value), token.column)
        if token.kind == "regex":
            self.advance()
            return Constant(compile_regex(str(token.value), token.column, self.text), token.column)
        if token.kind == "word":
            self.advance()
            if self.peek().text == "(" and _FIELD.fullmatch(token.text):
                return self.parse_call(token)
            return _word(token, self.text)
        found = token.text or "the end of the rule"
        raise self.error(f"expected a field or a value, found {found!r}")

    def parse_list(self, opening: Token) -> Node:
        items: list[Scalar | Network] = []
        while True:
            item = self.parse_operand()
            if not isinstance(item, Constant) or isinstance(item.value, (tuple, re.Pattern)):
                raise RuleSyntaxError("a list holds values only", _column(item), self.text)
            items.append(item.value)
            if not self.accept(","):
                break
        self.expect("]")
        return Constant(tuple(items), opening.column)

    def parse_call(self, name: Token) -> Node:
        self.expect("(")
        args: list[Node] = []
        if not self.accept(")"):
            args.append(self.parse_operand())
            while self.accept(","):
                args.append(self.parse_operand())
            self.expect(")")
        return Call(name.text, tuple(args), name.column)


def _comparator(token: Token) -> Comparator | None:
    if token.kind == "symbol" and token.text in ("==", "!=", "<", "<=", ">", ">="):
        return token.text  # type: ignore[return-value]
    if token.kind == "word":
        return _WORD_OPERATORS.get(token.text.lower())
    return None


def _column(node: Node) -> int:
    if isinstance(node, (Constant, Field, Call, Compare)):
        return node.column
    if isinstance(node, Not):
        return _column(node.operand)
    return _column(node.operands[0])


def _word(token: Token, text: str) -> Node:
    word = token.text
    lowered = word.lower()
    if lowered in ("true", "false"):
        return Constant(lowered == "true", token.column)
    if _NUMBER.fullmatch(word):
        return Constant(float(word) if "." in word else int(word), token.column)
    if ":" in word or "/" in word or word[0].isdigit():
        try:
            return Constant(_address(word), token.column)
        except ValueError:
            raise RuleSyntaxError(
                f"{word!r} is not a number, address or network", token.column, text
            ) from None
    if _FIELD.fullmatch(word):
        if lowered in _WORD_OPERATORS or lowered in ("and", "or", "not"):
            raise RuleSyntaxError(f"{word!r} needs a value on its left", token.column, text)
        return Field(word, token.column)
    raise RuleSyntaxError(f"{word!r} is not a field name", token.column, text)


def _address(word: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | Network:
    if "/" in word:
        return ipaddress.ip_network(word, strict=False)
    return ipaddress.ip_address(word)


# Regexes run on text from the network: a nested quantifier such as (a+)+ can take
# exponential time in Python's backtracking engine (rulekit uses RE2, which cannot), so
# such patterns, and backreferences, are refused; subjects are also capped in length.
_NESTED_QUANTIFIER = re.compile(r"\([^()]*[+*}][^()]*\)\s*[+*{]")
_BACKREFERENCE = re.compile(r"\\[1-9]|\(\?P=")


def compile_regex(pattern: str, column: int, text: str) -> re.Pattern[str]:
    if _NESTED_QUANTIFIER.search(pattern):
        raise RuleSyntaxError(
            "regular expression repeats a repeated group (catastrophic backtracking); "
            "rewrite it without a quantifier on a group that has one",
            column,
            text,
        )
    if _BACKREFERENCE.search(pattern):
        raise RuleSyntaxError("backreferences are not supported in rules", column, text)
    try:
        return re.compile(pattern)
    except re.error as error:
        raise RuleSyntaxError(f"bad regular expression: {error}", column, text) from None


def parse(text: str) -> Node:
    """The syntax tree of one rule; RuleSyntaxError with the column if it does not parse."""
    return _Parser(text).parse()
