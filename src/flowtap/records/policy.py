"""Which capture level each HTTP transaction gets: the configuration's http_capture rules,
first match wins (as in Qtap), else the default level. One policy for the sensor's and the
proxy's records."""

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


class CapturePolicy:
    def __init__(
        self,
        base: HttpRecordOptions,
        rules: Sequence[CaptureRule] = (),
        macros: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.base = base
        self._by_level = {level: replace(base, level=level) for level in CAPTURE_LEVELS}
        self._rules: FirstMatch[CaptureLevel] | None = (
            compile_rules([(r.name, r.expr, r.level) for r in rules], base.level, dict(macros))
            if rules
            else None
        )
        self.chosen: dict[str, int] = {}  # rule name -> transactions it chose the level of

    @property
    def highest_level(self) -> CaptureLevel:
        """The most any transaction can get: what the kernel must copy."""
        levels = (
            [self.base.level, *(named.outcome for named in self._rules.rules)]
            if (self._rules)
            else [self.base.level]
        )
        return max(levels, key=CAPTURE_LEVELS.index)

    def options_for(self, tx: Transaction, ctx: ConnectionContext) -> HttpRecordOptions:
        if self._rules is None:
            return self.base
        peer = Peer(
            ip=ctx.remote_ip,
            port=ctx.remote_port,
            domain=ctx.sni,
            tls=ctx.tls,
            sni=ctx.sni,
        )
        protocol = "http2" if tx.request and tx.request.version == "2" else "http1"
        fields = TransactionFields(Subject(tx, ctx.process, ctx.direction, protocol, peer))
        level, name = self._rules.choose(fields)
        if name is not None:
            self.chosen[name] = self.chosen.get(name, 0) + 1
        return self._by_level[level]
