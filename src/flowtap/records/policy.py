"""Which capture level each HTTP transaction gets: the configuration's http_capture rules,
first match wins (as in Qtap), else the stack's level; a transaction to a domain listed in
`tap.endpoints` uses that endpoint's stack. One policy for the sensor's and the proxy's
records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from flowtap.protocols.messages import Transaction
from flowtap.records.http import CAPTURE_LEVELS, CaptureLevel, ConnectionContext, HttpRecordOptions
from flowtap.rules.fields import Peer, Subject, TransactionFields
from flowtap.rules.levels import FirstMatch, compile_rules


@dataclass(frozen=True, slots=True)
class CaptureRule:
    name: str
    expr: str
    level: CaptureLevel
    origin: str  # file:line of the expression


@dataclass(frozen=True, slots=True)
class EndpointCapture:
    """`tap.endpoints[]`: a domain (or `*.domain` for its subdomains) and its stack's
    http_capture level and rules."""

    domain: str
    level: CaptureLevel
    rules: tuple[CaptureRule, ...] = ()

    def matches(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        pattern = self.domain.lower().rstrip(".")
        if pattern.startswith("*."):
            return host.endswith(pattern[1:])
        return host == pattern


class CapturePolicy:
    def __init__(
        self,
        base: HttpRecordOptions,
        rules: Sequence[CaptureRule] = (),
        macros: Sequence[tuple[str, str]] = (),
        endpoints: Sequence[EndpointCapture] = (),
    ) -> None:
        self.base = base
        self._by_level = {level: replace(base, level=level) for level in CAPTURE_LEVELS}
        self._macros = dict(macros)
        self._default = self._stack(base.level, rules)
        self._endpoints = [(e, self._stack(e.level, e.rules)) for e in endpoints]
        self.chosen: dict[str, int] = {}  # rule name -> transactions it chose the level of
        # Fixed once compiled: no rule to run per transaction, and the most any
        # transaction can get (what the kernel must copy, what the parsers must keep).
        self.trivial = not self._default.rules and not self._endpoints
        stacks = [self._default, *(stack for _e, stack in self._endpoints)]
        self.highest_level: CaptureLevel = max(
            (level for stack in stacks for level in stack.default_and_outcomes()),
            key=CAPTURE_LEVELS.index,
        )

    def _stack(self, level: CaptureLevel, rules: Sequence[CaptureRule]) -> FirstMatch[CaptureLevel]:
        return compile_rules([(r.name, r.expr, r.level) for r in rules], level, self._macros)

    def options_for(self, tx: Transaction, ctx: ConnectionContext) -> HttpRecordOptions:
        if self.trivial:
            return self.base
        peer = Peer(
            ip=ctx.remote_ip, port=ctx.remote_port, domain=ctx.sni, tls=ctx.tls, sni=ctx.sni
        )
        protocol = "http2" if tx.request and tx.request.version == "2" else "http1"
        fields = TransactionFields(Subject(tx, ctx.process, ctx.direction, protocol, peer))
        stack = self._default
        if self._endpoints:
            host = fields.get("http.req.host") or ctx.sni
            if isinstance(host, str):
                stack = next((s for e, s in self._endpoints if e.matches(host)), stack)
        level, name = stack.choose(fields)
        if name is not None:
            self.chosen[name] = self.chosen.get(name, 0) + 1
        return self._by_level[level]
