"""What the egress proxy reports: per-connection context, connection events, counters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from flowtap.protocols.messages import Transaction

__all__ = [
    "ConnectionEvent",
    "ConnectionHandler",
    "Mode",
    "Outcome",
    "ProxyContext",
    "ProxyStats",
    "TransactionHandler",
]

Mode = Literal["transparent", "explicit"]
# intercepted: TLS terminated (or plain HTTP proxied) and parsed; passthrough: TLS relayed
# untouched because the client rejected our certificate before; relayed: not HTTP, relayed
# as bytes; upstream_failed: the destination could not be reached or verified; rejected:
# the client refused our certificate (with evidence, its connections to this destination
# pass through for a while: proxy/passthrough.py) or the connection was refused (not
# loopback, a loop, a bad proxy request, a ClientHello that stopped coming or a client gone
# before its first message was whole).
Outcome = Literal["intercepted", "passthrough", "relayed", "upstream_failed", "rejected"]


@dataclass(slots=True)
class ProxyContext:
    """One proxied client connection, filled in as the proxy learns about it."""

    connection_id: int
    mode: Mode
    client: tuple[str, int]  # the client's address (its end of the connection to us)
    destination: tuple[str, int]  # original destination (transparent) or CONNECT/URL target
    pid: int | None  # the client process, from the injected attribution
    started_ns: int  # time.monotonic_ns() at accept
    sni: str | None = None
    tls: bool = False  # the client spoke TLS to the destination (terminated or not)
    alpn: str | None = None  # ALPN agreed with the upstream (and mirrored to the client)
    l7_protocol: str | None = None  # "http1", "http2", "tls", "other"

    def snapshot(self) -> ProxyContext:
        return dataclasses.replace(self)


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """A proxied connection opened (after its destination is known) or closed.

    Byte counts are what the client sent and what it was sent, as the proxy relayed them:
    plaintext when TLS was terminated, TLS records otherwise.
    """

    event: Literal["open", "close"]
    context: ProxyContext  # a snapshot taken when the event was made
    timestamp_ns: int  # time.monotonic_ns()
    outcome: Outcome | None = None  # close only
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    error: str | None = None  # why the connection failed or was refused, if it was


TransactionHandler = Callable[[Transaction, ProxyContext], None]
ConnectionHandler = Callable[[ConnectionEvent], None]


@dataclass(slots=True)
class ProxyStats:
    """Counters of everything the proxy did, dropped or refused."""

    connections: int = 0
    intercepted: int = 0
    passthrough: int = 0
    relayed: int = 0
    server_first: int = 0  # relayed at once: the upstream spoke before the client did
    upstream_failed: int = 0
    rejected_by_client: int = 0  # client refused our certificate
    client_handshake_errors: int = 0  # other failed client handshakes (timeouts included)
    timeouts_client_hello: int = 0  # a ClientHello stopped coming before it was whole: closed
    refused_client_hello: int = 0  # TLS records that are no ClientHello we parse: closed
    client_incomplete: int = 0  # the client closed before its first message was whole
    refused_not_loopback: int = 0  # explicit listener: peer not on loopback
    refused_loop: int = 0  # transparent: the "original destination" was ourselves
    refused_no_destination: int = 0  # SO_ORIGINAL_DST unavailable
    refused_over_limit: int = 0  # closed at accept: max_connections were being served
    accept_errors: int = 0  # accept failed (EMFILE...): the client waits in the backlog
    requests: int = 0
    responses_502: int = 0
    refused_smuggling: int = 0  # 400: CL+TE, duplicate CL, bad TE, bad chunk framing
    refused_bad_request: int = 0  # 400: malformed request line or header
    refused_header_too_large: int = 0  # 431: header section or count over the limit
    timeouts_header: int = 0  # 408: slow client while sending a request head
    timeouts_idle: int = 0  # keep-alive or relay idle, closed
    timeouts_upstream: int = 0  # upstream did not connect or answer in time
    upstream_bad_response: int = 0  # the upstream's response was not valid HTTP/1.x
    parser_errors: int = 0  # the passive parser gave up on a connection (records lost)
    http2_header_limit: int = 0  # ...of them: an HTTP/2 header cap (HPACK bomb) was hit
    h2_flood_closed: int = 0  # HTTP/2 clients over a frame-rate limit: GOAWAY, closed
    transactions: int = 0
    callback_errors: int = 0  # a handler raised (logged, the proxy goes on)
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out
