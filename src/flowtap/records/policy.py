"""Which capture level each HTTP transaction gets: the configuration's http_capture rules,
first match wins (as in Qtap), else the stack's level; a transaction to a domain listed in
`tap.endpoints` uses that endpoint's stack. One policy for the sensor's and the proxy's
records.

A stack's `access_logs` plugin (records/access_log.py) is decided here too, from the same
fields: its record goes to `emit`. A process whose QPOINT_STRATEGY is `audit` gets
neither (its connections are recorded, its payloads are not: `audited`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from flowtap.protocols.messages import Transaction
from flowtap.records.access_log import LEVEL_MODE, MODE_LEVEL, AccessLogs, access_log_record
from flowtap.records.cmdline import redact_query
from flowtap.records.connection import Record, WallClock
from flowtap.records.http import CAPTURE_LEVELS, CaptureLevel, ConnectionContext, HttpRecordOptions
from flowtap.rules.fields import Peer, Subject, TransactionFields
from flowtap.rules.levels import FirstMatch, compile_rules

log = logging.getLogger("flowtap.rules")


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
    access_logs: AccessLogs | None = None

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
        access_logs: AccessLogs | None = None,
        *,
        emit: Callable[[Record], None] | None = None,
        audited: Callable[[int], bool] | None = None,
        debug: bool = False,
    ) -> None:
        self.base = base
        self._by_level = {level: replace(base, level=level) for level in CAPTURE_LEVELS}
        self._macros = dict(macros)
        self._default = self._stack(base.level, rules)
        self._default_logs = self._logs(access_logs)
        self._endpoints = [
            (e, self._stack(e.level, e.rules), self._logs(e.access_logs)) for e in endpoints
        ]
        self._emit = emit
        self._audited = audited
        self._debug = debug
        # The debug plugin shows its lines without -v; a reload without it stops them.
        log.setLevel(logging.DEBUG if debug else logging.NOTSET)
        self._clock = WallClock()
        self.chosen: dict[str, int] = {}  # rule name -> transactions it chose the level of
        self.access_logs = 0  # access-log records emitted
        # Fixed once compiled: no rule to run per transaction, and the most any
        # transaction can get (what the kernel must copy, what the parsers must keep).
        any_logs = self._default_logs is not None or any(
            logs is not None for _e, _s, logs in self._endpoints
        )
        self.trivial = not self._default.rules and not self._endpoints and not any_logs
        stacks = [self._default, *(stack for _e, stack, _l in self._endpoints)]
        stacks += [logs for _f, logs in self._all_logs()]
        self.highest_level: CaptureLevel = max(
            (level for stack in stacks for level in stack.default_and_outcomes()),
            key=CAPTURE_LEVELS.index,
        )

    def _logs(
        self, plugin: AccessLogs | None
    ) -> tuple[AccessLogs, FirstMatch[CaptureLevel]] | None:
        """The plugin and its rules, their modes as the capture levels they need."""
        if plugin is None:
            return None
        return plugin, self._stack(MODE_LEVEL[plugin.mode], plugin.rules)

    def _all_logs(self) -> list[tuple[AccessLogs, FirstMatch[CaptureLevel]]]:
        found = [self._default_logs, *(logs for _e, _s, logs in self._endpoints)]
        return [logs for logs in found if logs is not None]

    def _stack(self, level: CaptureLevel, rules: Sequence[CaptureRule]) -> FirstMatch[CaptureLevel]:
        return compile_rules([(r.name, r.expr, r.level) for r in rules], level, self._macros)

    def options_for(self, tx: Transaction, ctx: ConnectionContext) -> HttpRecordOptions:
        if self._audited is not None:
            pid = ctx.process.get("pid")
            if isinstance(pid, int) and self._audited(pid):
                return self._by_level["none"]  # QPOINT_STRATEGY=audit: no payload records
        if self.trivial:
            return self.base
        peer = Peer(
            ip=ctx.remote_ip, port=ctx.remote_port, domain=ctx.sni, tls=ctx.tls, sni=ctx.sni
        )
        protocol = "http2" if tx.request and tx.request.version == "2" else "http1"
        fields = TransactionFields(Subject(tx, ctx.process, ctx.direction, protocol, peer))
        stack, logs = self._default, self._default_logs
        if self._endpoints:
            host = fields.get("http.req.host") or ctx.sni
            if isinstance(host, str):
                stack, logs = next(
                    ((s, lg) for e, s, lg in self._endpoints if e.matches(host)), (stack, logs)
                )
        level, name = stack.choose(fields)
        if name is not None:
            self.chosen[name] = self.chosen.get(name, 0) + 1
        if self._debug:
            self._log_decision(tx, name, level)
        if logs is not None:
            self._access_log(tx, ctx, fields, *logs)
        return self._by_level[level]

    def _access_log(
        self,
        tx: Transaction,
        ctx: ConnectionContext,
        fields: TransactionFields,
        plugin: AccessLogs,
        rules: FirstMatch[CaptureLevel],
    ) -> None:
        level, name = rules.choose(fields)
        if name is not None:
            self.chosen[name] = self.chosen.get(name, 0) + 1
        if self._emit is None or level == "none":
            return
        record = access_log_record(
            tx,
            ctx,
            mode=LEVEL_MODE[level],
            fmt=plugin.format,
            options=self._by_level[level],
            clock=self._clock,
        )
        if record is not None:
            self.access_logs += 1
            self._emit(record)

    @staticmethod
    def _log_decision(tx: Transaction, name: str | None, level: CaptureLevel) -> None:
        """The `debug` plugin: each transaction's rule decision, at DEBUG."""
        request = tx.request
        method = request.method if request else "-"
        # The query's credentials stay out of the log, as out of the records.
        url = (request.authority or "") + redact_query(request.target) if request else "-"
        log.debug("rule %s chose %s for %s %s", name or "(default)", level, method, url)
