"""Feeds the plaintext the proxy relays into the passive HTTP parsers, one connection each.

The proxy builds no HTTP model of its own for records: the bytes it forwards, per direction,
go through the same parsers as bytes seen by the uprobes, so the records are the same.
"""

from __future__ import annotations

import logging
import time

from flowtap.protocols.http1 import Http1Parser
from flowtap.protocols.http2 import PREFACE, Http2Parser
from flowtap.protocols.messages import Side, Transaction
from flowtap.proxy.events import ProxyContext, ProxyStats, TransactionHandler

__all__ = ["Capture"]

log = logging.getLogger("flowtap.proxy")


class Capture:
    """One connection's parser; ``http2`` picks the parser up front (from ALPN), else the
    client's first bytes do (the HTTP/2 preface, or HTTP/1.x)."""

    __slots__ = ("_ctx", "_failed", "_http2", "_max_body", "_on_tx", "_parser", "_stats")

    def __init__(
        self,
        ctx: ProxyContext,
        on_transaction: TransactionHandler,
        stats: ProxyStats,
        *,
        max_body: int,
        http2: bool | None = None,
    ) -> None:
        self._ctx = ctx
        self._on_tx = on_transaction
        self._stats = stats
        self._max_body = max_body
        self._http2 = http2
        self._parser: Http1Parser | Http2Parser | None = None
        self._failed = False

    def client(self, data: bytes) -> None:
        self._feed("client", data)

    def server(self, data: bytes) -> None:
        self._feed("server", data)

    def _feed(self, side: Side, data: bytes) -> None:
        if self._failed or not data:
            return
        parser = self._parser
        if parser is None:
            h2 = self._http2
            if h2 is None:
                h2 = side == "client" and data.startswith(PREFACE[: len(data)])
            parser = self._parser = (
                Http2Parser(max_body=self._max_body) if h2 else Http1Parser(max_body=self._max_body)
            )
        self._deliver(parser.feed(side, data, time.monotonic_ns()))

    def close(self) -> None:
        if self._parser is not None and not self._failed:
            self._deliver(self._parser.close(time.monotonic_ns()))
        self._failed = True  # nothing more is parsed

    def _deliver(self, transactions: list[Transaction]) -> None:
        for tx in transactions:
            self._stats.transactions += 1
            try:
                self._on_tx(tx, self._ctx)
            except Exception:
                self._stats.callback_errors += 1
                log.exception("transaction handler failed")
        parser = self._parser
        if parser is not None and parser.failed and not self._failed:
            self._failed = True
            self._stats.parser_errors += 1
            if isinstance(parser, Http2Parser) and parser.header_limit:
                self._stats.http2_header_limit += 1
            log.debug("connection %d: parser gave up: %s", self._ctx.connection_id, parser.failed)
