"""The egress proxy: a transparent listener (redirected connections) and an explicit one
(HTTP_PROXY/HTTPS_PROXY), both on loopback only.

Each accepted connection is sniffed before a byte is consumed (MSG_PEEK, proxy/sniff.py):

* a TLS ClientHello: the upstream is reached first with the client's SNI and ALPN offer and
  verified, then the client's TLS is terminated with a leaf for that name offering exactly
  the ALPN the upstream chose; HTTP/1.x is forwarded request by request, HTTP/2 relayed
  frame for frame. A client that refuses our certificate (a certificate alert, or a few
  hang-ups mid-handshake) has its connections to that destination (and SNI) passed
  through untouched for a while (proxy/passthrough.py);
* plain HTTP/1.x is forwarded; the HTTP/2 preface (prior knowledge) is relayed;
* anything else (or a server that speaks first) is relayed as bytes. Bytes that may
  still become a request line or a ClientHello are waited for, however slowly they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from flowtap.protocols.tls_hello import ClientHello, TlsParseError, parse_client_hello
from flowtap.proxy.ca import CertificateAuthority
from flowtap.proxy.capture import Capture
from flowtap.proxy.channel import Channel, accept_channel, describe_error, open_channel
from flowtap.proxy.events import (
    ConnectionEvent,
    ConnectionHandler,
    Mode,
    Outcome,
    ProxyContext,
    ProxyStats,
    TransactionHandler,
)
from flowtap.proxy.forward import Http1Forwarder, Limits
from flowtap.proxy.h2guard import relay_h2
from flowtap.proxy.original_dst import so_original_dst
from flowtap.proxy.passthrough import PassthroughKey, PassthroughTable, client_key
from flowtap.proxy.preconnect import Preconnected
from flowtap.proxy.relay import relay
from flowtap.proxy.sniff import MAX_CLIENT_HELLO, Kind, classify, peek_until
from flowtap.proxy.tls import ClientContexts, UpstreamContexts, rejection_evidence
from flowtap.records.http import HttpRecordOptions

__all__ = [
    "ClientProcess",
    "EgressProxy",
    "OriginalDestination",
    "ProxyConfig",
]

log = logging.getLogger("flowtap.proxy")

OriginalDestination = Callable[[socket.socket], tuple[str, int]]
ClientProcess = Callable[[tuple[str, int]], int | None]

_PLAIN_HTTP_ALPN = (None, "http/1.1", "http/1.0")


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    transparent_port: int = 0  # 0: an ephemeral port (see EgressProxy.transparent_address)
    host6: str | None = "::1"  # IPv6 transparent listener (same port if free); None: none
    explicit_port: int | None = 0  # None: no explicit listener
    upstream_ca_file: str | None = None  # trusted besides the system roots (tests)
    http: HttpRecordOptions = field(default_factory=HttpRecordOptions)
    limits: Limits = field(default_factory=Limits)
    tls_handshake_timeout: float = 10.0  # also: a ClientHello's bytes, from one to the next
    # Passthrough (proxy/passthrough.py): (client, destination, SNI) entries, how long
    # each lasts, and how many mid-handshake hang-ups from one client earn one.
    passthrough_cache: int = 4096
    passthrough_ttl: float = 3600.0
    passthrough_hangups: int = 3
    backlog: int = 1024
    # Connections served at once; more are closed at accept (refused_over_limit). None:
    # from the open-files limit at start (see connection_cap).
    max_connections: int | None = None


def _is_loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# Descriptors kept for everything but proxied connections (BPF maps and links, output,
# the listeners...); each proxied connection takes two (client and upstream sockets).
FD_RESERVE = 256
_FDS_PER_CONNECTION = 2
_WARN_EVERY_S = 60.0  # the over-limit and accept-failure warnings, at most this often


def connection_cap() -> int:
    """How many connections the proxy serves at once within the open-files limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, (soft - FD_RESERVE) // _FDS_PER_CONNECTION)


class _Result:
    """How a connection ended, built up while it is served."""

    __slots__ = ("error", "from_client", "outcome", "to_client")

    def __init__(self) -> None:
        self.outcome: Outcome = "relayed"
        self.error: str | None = None
        self.from_client = 0
        self.to_client = 0


class EgressProxy:
    """The proxy; ``await start()``, then ``await stop()`` (or ``async with``)."""

    def __init__(
        self,
        config: ProxyConfig,
        ca: CertificateAuthority,
        *,
        on_transaction: TransactionHandler | None = None,
        on_connection: ConnectionHandler | None = None,
        original_destination: OriginalDestination = so_original_dst,
        client_process: ClientProcess | None = None,
        connection_ids: Iterator[int] | None = None,
    ) -> None:
        self.config = config
        self.ca = ca
        self.stats = ProxyStats()
        self._on_transaction = on_transaction
        self._on_connection = on_connection
        self._original_destination = original_destination
        self._client_process = client_process
        self._ids = connection_ids if connection_ids is not None else itertools.count(1)
        self._client_tls = ClientContexts(ca)
        self._upstream_tls = UpstreamContexts(extra_ca_file=config.upstream_ca_file)
        self._passthrough = PassthroughTable(
            ttl=config.passthrough_ttl,
            hangups=config.passthrough_hangups,
            capacity=config.passthrough_cache,
        )
        self._listeners: list[tuple[socket.socket, Mode]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._own: set[tuple[str, int]] = set()
        self._open = 0  # connections being served
        self.max_connections = 0  # set at start
        self._warned_at: dict[str, float] = {}
        self.transparent_address: tuple[str, int] | None = None
        self.transparent_address6: tuple[str, int] | None = None
        self.explicit_address: tuple[str, int] | None = None
        self._http_level = config.http.level
        self._body_keep = config.http.max_body_bytes if config.http.level == "full" else 0

    def set_capture(self, http: HttpRecordOptions) -> None:
        """A reloaded configuration: connections accepted from now on parse for this."""
        self._body_keep = http.max_body_bytes if http.level == "full" else 0
        self._http_level = http.level

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if not _is_loopback(cfg.host):
            raise ValueError(f"the proxy listens on loopback only, not {cfg.host}")
        self.max_connections = cfg.max_connections or connection_cap()
        sock = self._listen(socket.AF_INET, cfg.host, cfg.transparent_port)
        self.transparent_address = sock.getsockname()[:2]
        self._listeners.append((sock, "transparent"))
        if cfg.host6 is not None and socket.has_ipv6:
            try:
                sock6 = self._listen(socket.AF_INET6, cfg.host6, self.transparent_address[1])
            except OSError:
                sock6 = None  # IPv6 off, or that port taken on ::1: IPv4 only
            if sock6 is not None:
                self.transparent_address6 = sock6.getsockname()[:2]
                self._listeners.append((sock6, "transparent"))
        if cfg.explicit_port is not None:
            sock = self._listen(socket.AF_INET, cfg.host, cfg.explicit_port)
            self.explicit_address = sock.getsockname()[:2]
            self._listeners.append((sock, "explicit"))
        for listener, mode in self._listeners:
            self._own.add(listener.getsockname()[:2])
            self._spawn(self._accept_loop(listener, mode))

    def _listen(self, family: int, host: str, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(self.config.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def stop(self) -> None:
        for listener, _ in self._listeners:
            listener.close()
        self._listeners.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> EgressProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def counters(self) -> dict[str, int]:
        out = self.stats.as_dict()
        out.update(self._passthrough.counters())
        out["leaves_signed"] = self.ca.leaves_signed
        out["open_connections"] = self._open
        out["max_connections"] = self.max_connections
        return out

    def passthrough_destinations(self) -> list[PassthroughKey]:
        """(client, host, port, SNI) of the live passthrough entries, oldest first."""
        return self._passthrough.entries()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket, mode: Mode) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except (OSError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) or listener.fileno() < 0:
                    return
                self.stats.accept_errors += 1
                self._warn(
                    "accept",
                    "the proxy cannot accept connections (%s; %d so far): raise the "
                    "open-files limit (LimitNOFILE= in the service, ulimit -n)",
                    exc,
                    self.stats.accept_errors,
                )
                await asyncio.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            if self._open >= self.max_connections:
                # Over the cap the next accept or upstream connect would fail on the
                # open-files limit (EMFILE) for every client: refuse this one at once.
                sock.close()
                self.stats.refused_over_limit += 1
                self._warn(
                    "limit",
                    "egress proxy at its limit of %d connections: %d refused so far; raise "
                    "the open-files limit (LimitNOFILE= in the service, ulimit -n) to serve "
                    "more (the cap is (limit - %d) / 2)",
                    self.max_connections,
                    self.stats.refused_over_limit,
                    FD_RESERVE,
                )
                continue
            sock.setblocking(False)
            # Answers are small writes: never hold them back for an ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._serve(sock, (peer[0], peer[1]), mode))

    # -- per connection ---------------------------------------------------------------

    def _emit(self, event: ConnectionEvent) -> None:
        if self._on_connection is None:
            return
        try:
            self._on_connection(event)
        except Exception:
            self.stats.callback_errors += 1
            log.exception("connection handler failed")

    def _context(
        self, mode: Mode, peer: tuple[str, int], destination: tuple[str, int]
    ) -> ProxyContext:
        pid = None
        if self._client_process is not None:
            try:
                pid = self._client_process(peer)
            except OSError as exc:  # out of descriptors, /proc gone: the record is counted
                self.stats.callback_errors += 1
                self._warn(
                    "lookup",
                    "client processes not looked up (%s; %d so far): their records are "
                    "counted as egress_callback_errors",
                    exc,
                    self.stats.callback_errors,
                )
            except Exception:
                self.stats.callback_errors += 1
                log.exception("client process lookup failed")
        return ProxyContext(
            connection_id=next(self._ids),
            mode=mode,
            client=peer,
            destination=destination,
            pid=pid,
            started_ns=time.monotonic_ns(),
        )

    def _warn(self, what: str, message: str, *args: object) -> None:
        """A warning at most every _WARN_EVERY_S per kind (a flood says it once)."""
        now = time.monotonic()
        last = self._warned_at.get(what)
        if last is None or now - last >= _WARN_EVERY_S:
            self._warned_at[what] = now
            log.warning(message, *args)

    async def _serve(self, sock: socket.socket, peer: tuple[str, int], mode: Mode) -> None:
        self.stats.connections += 1
        self._open += 1
        try:
            if mode == "explicit":
                await self._serve_explicit(sock, peer)
            else:
                await self._serve_transparent(sock, peer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("proxy connection from %s failed", peer)
        finally:
            self._open -= 1
            sock.close()  # no-op once a transport owns (and closed) it

    async def _serve_transparent(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            destination = self._original_destination(sock)
        except OSError as exc:
            self.stats.refused_no_destination += 1
            log.debug("no original destination for %s: %s", peer, exc)
            return
        if destination in self._own or (
            destination[1] in {port for _, port in self._own} and _is_loopback(destination[0])
        ):
            self.stats.refused_loop += 1  # a direct connection to the listener, not a redirect
            return
        ctx = self._context("transparent", peer, destination)
        await self._run(sock, ctx, b"")

    async def _run(self, sock: socket.socket, ctx: ProxyContext, preamble: bytes) -> None:
        """Open event, the connection served, close event."""
        self._emit(ConnectionEvent("open", ctx.snapshot(), ctx.started_ns))
        result = _Result()
        result.from_client = len(preamble)
        # The destination is reached while the client is sniffed (a server that speaks
        # first is heard at once, through CONNECT too).
        pre = Preconnected(ctx.destination, self.config.limits.upstream_connect_timeout)
        try:
            await self._dispatch(sock, ctx, result, pre)
        except asyncio.CancelledError:
            result.error = result.error or "proxy stopped"
            raise
        finally:
            if pre is not None:
                pre.close()
            self._closed(ctx, result)

    def _closed(self, ctx: ProxyContext, result: _Result) -> None:
        """Counts how the connection ended and reports its close."""
        self._count(result)
        self._emit(
            ConnectionEvent(
                "close",
                ctx.snapshot(),
                time.monotonic_ns(),
                outcome=result.outcome,
                bytes_from_client=result.from_client,
                bytes_to_client=result.to_client,
                error=result.error,
            )
        )

    def _count(self, result: _Result) -> None:
        if result.outcome == "intercepted":
            self.stats.intercepted += 1
        elif result.outcome == "passthrough":
            self.stats.passthrough += 1
        elif result.outcome == "relayed":
            self.stats.relayed += 1
        elif result.outcome == "upstream_failed":
            self.stats.upstream_failed += 1

    # -- explicit listener ------------------------------------------------------------

    async def _serve_explicit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        if not _is_loopback(peer[0]):
            self.stats.refused_not_loopback += 1
            return
        limits = self.config.limits
        try:
            head = await self._peek(
                sock,
                lambda data: b"\r\n\r\n" in data,
                limits.max_header_bytes,
                limits.header_timeout,
            )
        except TimeoutError:
            self.stats.timeouts_header += 1
            return
        if not head:
            return
        if not head.startswith(b"CONNECT "):
            # Absolute-form HTTP: forwarded request by request, each to the host it names.
            ctx = self._context("explicit", peer, ("", 0))
            await self._run_explicit_http(sock, ctx)
            return
        end = head.find(b"\r\n\r\n")
        target = head.split(b" ", 2)[1].decode("ascii", "replace") if end >= 0 else ""
        destination = _authority(target)
        if end < 0 or destination is None:
            self.stats.refused_bad_request += 1
            with contextlib.suppress(OSError):
                sock.send(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            return
        consumed = sock.recv(end + 4)  # exactly the CONNECT head: what follows is the tunnel
        ctx = self._context("explicit", peer, destination)
        try:
            sock.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        except OSError:
            return
        await self._run(sock, ctx, consumed)

    async def _run_explicit_http(self, sock: socket.socket, ctx: ProxyContext) -> None:
        self._emit(ConnectionEvent("open", ctx.snapshot(), ctx.started_ns))
        result = _Result()
        result.outcome = "intercepted"
        ctx.l7_protocol = "http1"
        try:
            client = await accept_channel(sock)
            forwarder = Http1Forwarder(
                client,
                ctx,
                self.stats,
                self.config.limits,
                self._plain_connector,
                self._capture(ctx, http2=False),
                explicit=True,
            )
            await self._forward(forwarder, result)
        finally:
            self._closed(ctx, result)

    # -- sniffing ---------------------------------------------------------------------

    async def _peek(
        self, sock: socket.socket, complete: Callable[[bytes], bool], most: int, timeout: float
    ) -> bytes:
        """The client's first bytes, left in the socket: once ``complete`` says so, at
        ``most`` bytes, or at EOF. TimeoutError when nothing complete came in time."""
        deadline = asyncio.get_running_loop().time() + timeout
        data = b""
        while True:
            more = await peek_until(sock, len(data), most, deadline)
            if len(more) <= len(data) or complete(more) or len(more) >= most:
                return more
            data = more

    async def _dispatch(
        self, sock: socket.socket, ctx: ProxyContext, result: _Result, pre: Preconnected | None
    ) -> None:
        first, kind = await self._first_bytes(sock, result, pre)
        if kind == "tls":
            try:
                hello = parse_client_hello(first)
            except TlsParseError as exc:
                # Never relayed as is: a server may take what this parser does not (a
                # ClientHello padded past MAX_CLIENT_HELLO before its SNI, an odd one),
                # and relaying it would let a client choose to pass uninspected.
                self.stats.refused_client_hello += 1
                ctx.tls = True
                ctx.l7_protocol = "tls"
                result.outcome = "rejected"
                result.error = f"ClientHello refused: {exc}"
                return
            await self._tls(sock, ctx, hello, result, pre=pre)
            return
        if kind == "http1":
            ctx.l7_protocol = "http1"
            client = await accept_channel(sock)

            async def connect(host: str, port: int) -> Channel:
                return await self._upstream_channel(pre, host, port)

            forwarder = Http1Forwarder(
                client,
                ctx,
                self.stats,
                self.config.limits,
                connect,
                self._capture(ctx, http2=False),
            )
            result.outcome = "intercepted"
            await self._forward(forwarder, result)
            return
        if kind is None:
            return  # refused or gone: said in result
        h2 = kind == "http2"
        ctx.l7_protocol = "http2" if h2 else "other"
        capture = self._capture(ctx, http2=True) if h2 else None
        await self._relay_raw(sock, ctx, result, capture, pre=pre)
        if h2 and result.outcome == "relayed":
            result.outcome = "intercepted"

    async def _first_bytes(
        self, sock: socket.socket, result: _Result, pre: Preconnected | None
    ) -> tuple[bytes, Kind | None]:
        """The client's first bytes and what they are (sniff.classify), left in the socket.
        ``other`` with no bytes when the server spoke first (SMTP, MySQL...); None when the
        connection is to be closed (the reason is in ``result``).

        The decision waits for the client as long as its bytes may still become a request
        line or a ClientHello: a pause never gets bytes relayed uninspected."""
        limits = self.config.limits
        loop = asyncio.get_running_loop()
        most = max(MAX_CLIENT_HELLO, limits.max_header_bytes + 1)
        try:
            data = await self._client_speaks(sock, pre, most)
        except TimeoutError:
            self.stats.timeouts_idle += 1
            result.error = f"neither side spoke within {limits.relay_idle_timeout:g}s"
            return b"", None
        if not data:
            return b"", "other"  # the server spoke first, or EOF: relayed
        header_deadline = loop.time() + limits.header_timeout
        while True:
            kind = classify(data, limits.max_header_bytes)
            if kind is not None:
                return data, kind
            tls = data[0] == 0x16
            # A ClientHello may come slowly as long as it comes; a request line has the
            # request head's time, from its first byte.
            deadline = loop.time() + self.config.tls_handshake_timeout if tls else header_deadline
            try:
                more = await peek_until(sock, len(data), most, deadline)
            except TimeoutError:
                if tls:
                    self.stats.timeouts_client_hello += 1
                    result.outcome = "rejected"  # closed: nothing was relayed
                    result.error = (
                        "ClientHello incomplete: no byte of it for "
                        f"{self.config.tls_handshake_timeout:g}s"
                    )
                    return data, None
                return data, "http1"  # the forwarder answers 408 on its own clock
            except OSError as exc:
                result.error = f"client: {describe_error(exc)}"
                return data, None
            if len(more) <= len(data):
                # EOF before the first message was whole: nothing worth relaying.
                self.stats.client_incomplete += 1
                result.outcome = "rejected"
                result.error = "client closed before its first message was complete"
                return data, None
            data = more

    async def _client_speaks(
        self, sock: socket.socket, pre: Preconnected | None, most: int
    ) -> bytes:
        """The client's first bytes (peeked); b"" when the server spoke first or the client
        closed. TimeoutError when both stayed silent for the relay idle timeout."""
        deadline = asyncio.get_running_loop().time() + self.config.limits.relay_idle_timeout
        peek = asyncio.ensure_future(peek_until(sock, 0, most, deadline))
        spoke = asyncio.ensure_future(pre.server_spoke()) if pre is not None else None
        waiting: set[asyncio.Future[Any]] = {peek} if spoke is None else {peek, spoke}
        try:
            while True:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if peek in done:
                    try:
                        return peek.result()
                    except OSError:
                        return b""
                if spoke is not None and spoke in done and spoke.exception() is None:
                    self.stats.server_first += 1
                    return b""
                # The early connect failed: the client's bytes still decide (and the
                # failure is reported when the connection is made for them).
        finally:
            pending = [task for task in (peek, spoke) if task is not None and not task.done()]
            for task in pending:
                task.cancel()
            # Until they have unwound, their readers still watch the sockets, which the
            # transports about to take them over would find taken (EEXIST).
            await asyncio.gather(*pending, return_exceptions=True)

    async def _upstream_channel(
        self,
        pre: Preconnected | None,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Channel:
        """A channel to the upstream: over the early connection when there is one left."""
        sock = await pre.take() if pre is not None else None
        return await open_channel(
            host,
            port,
            context=context,
            server_hostname=server_hostname,
            timeout=self.config.limits.upstream_connect_timeout,
            sock=sock,
        )

    async def _forward(self, forwarder: Http1Forwarder, result: _Result) -> None:
        try:
            await forwarder.run()
        finally:
            result.from_client += forwarder.from_client
            result.to_client += forwarder.to_client
            result.error = result.error or forwarder.error
            if forwarder.upstream_failed and result.outcome == "intercepted":
                result.outcome = "upstream_failed"
            if forwarder.capture is not None:
                forwarder.capture.close()

    def _capture(self, ctx: ProxyContext, *, http2: bool | None) -> Capture | None:
        if self._on_transaction is None or self._http_level == "none":
            return None  # no records wanted: do not parse at all
        return Capture(ctx, self._on_transaction, self.stats, max_body=self._body_keep, http2=http2)

    async def _plain_connector(self, host: str, port: int) -> Channel:
        return await open_channel(host, port, timeout=self.config.limits.upstream_connect_timeout)

    async def _relay_raw(
        self,
        sock: socket.socket,
        ctx: ProxyContext,
        result: _Result,
        capture: Capture | None,
        *,
        outcome: Outcome = "relayed",
        pre: Preconnected | None = None,
    ) -> None:
        """The client's bytes (anything still unread in its socket included) to the
        destination and back, unchanged."""
        host, port = ctx.destination
        try:
            upstream = await self._upstream_channel(pre, host, port)
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                self.stats.timeouts_upstream += 1
            result.outcome = "upstream_failed"
            result.error = f"upstream {host}:{port}: {describe_error(exc)}"
            return
        client = await accept_channel(sock)
        # Not known to be HTTP/2 (the server spoke first): guarded if the client's bytes are.
        await self._relay(client, upstream, result, capture, h2=ctx.l7_protocol == "http2" or None)
        result.outcome = outcome

    async def _relay(
        self,
        client: Channel,
        upstream: Channel,
        result: _Result,
        capture: Capture | None,
        *,
        h2: bool | None = False,  # None: if the client's first bytes are the h2 preface
    ) -> None:
        def up(data: bytes) -> None:
            result.from_client += len(data)
            if capture is not None:
                capture.client(data)

        def down(data: bytes) -> None:
            result.to_client += len(data)
            if capture is not None:
                capture.server(data)

        idle = self.config.limits.relay_idle_timeout
        try:
            if h2 is not False:  # with the flood guard (h2guard.py): GOAWAY for abusers
                finished, flood = await relay_h2(
                    client, upstream, up, down, idle_timeout=idle, stats=self.stats, sniff=not h2
                )
                result.error = flood or result.error
            else:
                finished = await relay(client, upstream, up, down, idle_timeout=idle)
            if not finished:
                self.stats.timeouts_idle += 1
                result.error = "idle"
        finally:
            if capture is not None:
                capture.close()

    # -- TLS --------------------------------------------------------------------------

    async def _tls(
        self,
        sock: socket.socket,
        ctx: ProxyContext,
        hello: ClientHello,
        result: _Result,
        *,
        pre: Preconnected | None,
    ) -> None:
        ctx.tls = True
        ctx.sni = hello.sni
        ctx.l7_protocol = "tls"
        host, port = ctx.destination
        key = (client_key(ctx.pid, ctx.client[0]), host, port, hello.sni)
        if self._passthrough.passes(key):
            await self._relay_raw(sock, ctx, result, None, outcome="passthrough", pre=pre)
            return
        server_name = hello.sni or host
        upstream: Channel | None = None
        upstream_error: str | None = None
        try:
            upstream = await self._upstream_channel(
                pre,
                host,
                port,
                context=self._upstream_tls.get(hello.alpn),
                server_hostname=server_name,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            if isinstance(exc, TimeoutError):
                self.stats.timeouts_upstream += 1
            upstream_error = f"upstream {host}:{port}: {describe_error(exc)}"
        if upstream is not None:
            alpn = upstream.alpn()
        else:
            # We answer the client ourselves (502): in HTTP/1.1 if it can speak it.
            alpn = "http/1.1" if "http/1.1" in hello.alpn else None
        try:
            client = await accept_channel(
                sock,
                self._client_tls.get(server_name, alpn),
                self.config.tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            if upstream is not None:
                upstream.close()
            result.outcome = "rejected"
            evidence = rejection_evidence(exc)
            if evidence is not None:
                self.stats.rejected_by_client += 1
                learned = self._passthrough.rejected(key, evidence)
                result.error = (
                    f"client rejected our certificate ({evidence}"
                    f"{'; its connections here pass through for a while' if learned else ''}): "
                    f"{describe_error(exc)}"
                )
            else:
                self.stats.client_handshake_errors += 1
                result.error = f"client TLS handshake failed: {describe_error(exc)}"
            return
        ctx.alpn = alpn
        if upstream is None:
            await self._tls_http1(client, ctx, result, None, upstream_error)
            result.outcome = "upstream_failed"
            result.error = upstream_error
            return
        result.outcome = "intercepted"
        if alpn == "h2":
            ctx.l7_protocol = "http2"
            await self._relay(client, upstream, result, self._capture(ctx, http2=True), h2=True)
        elif alpn in _PLAIN_HTTP_ALPN:
            await self._tls_http1(client, ctx, result, upstream, None)
        else:
            ctx.l7_protocol = "other"
            await self._relay(client, upstream, result, None)

    async def _tls_http1(
        self,
        client: Channel,
        ctx: ProxyContext,
        result: _Result,
        upstream: Channel | None,
        upstream_error: str | None,
    ) -> None:
        """HTTP/1.x inside terminated TLS, if the client's first bytes are HTTP/1.x (by the
        same grammar and rules as in plaintext); any other protocol is relayed as
        plaintext, HTTP/2 with prior knowledge recorded."""
        if upstream is not None:
            kind = await self._client_kind(client, upstream, result)
            if kind is None:
                client.close()
                upstream.close()
                return
            if kind != "http1":
                h2 = kind == "http2"
                ctx.l7_protocol = "http2" if h2 else "other"
                capture = self._capture(ctx, http2=True) if h2 else None
                await self._relay(client, upstream, result, capture, h2=h2)
                return
        ctx.l7_protocol = "http1"
        server_name = ctx.sni or ctx.destination[0]

        async def reconnect(host: str, port: int) -> Channel:
            return await open_channel(
                host,
                port,
                context=self._upstream_tls.get(("http/1.1",)),
                server_hostname=server_name,
                timeout=self.config.limits.upstream_connect_timeout,
            )

        forwarder = Http1Forwarder(
            client,
            ctx,
            self.stats,
            self.config.limits,
            reconnect,
            self._capture(ctx, http2=False),
            upstream=upstream,
            upstream_error=upstream_error,
        )
        await self._forward(forwarder, result)

    async def _client_kind(
        self, client: Channel, upstream: Channel, result: _Result
    ) -> Kind | None:
        """What the client speaks inside the TLS we terminated: sniff.classify on its first
        plaintext bytes, waited for as in plaintext. ``other`` when the server speaks first
        (IMAPS, SMTPS); None (closed) when neither speaks or the client stops mid-line."""
        limits = self.config.limits
        loop = asyncio.get_running_loop()
        if not client.buf:
            client_fill = asyncio.ensure_future(_bytes_or_eof(client))
            server_fill = asyncio.ensure_future(_bytes_or_eof(upstream))
            try:
                done, _ = await asyncio.wait(
                    {client_fill, server_fill},
                    timeout=limits.relay_idle_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for task in (client_fill, server_fill):
                    task.cancel()
                await asyncio.gather(client_fill, server_fill, return_exceptions=True)
            if not done:
                self.stats.timeouts_idle += 1
                result.error = f"neither side spoke within {limits.relay_idle_timeout:g}s"
                return None
            if not client.buf:
                if upstream.buf:
                    self.stats.server_first += 1
                return "other"  # the server spoke first, or the client closed: relayed
        deadline = loop.time() + limits.header_timeout
        most = limits.max_header_bytes + 1
        while True:
            kind = classify(bytes(client.buf[:most]), limits.max_header_bytes)
            if kind is not None:
                return kind
            try:
                async with asyncio.timeout_at(deadline):
                    more = await client.fill()
            except TimeoutError:
                return "http1"  # the forwarder answers 408 on its own clock
            if not more:
                self.stats.client_incomplete += 1
                result.error = "client closed before its first message was complete"
                return None


async def _bytes_or_eof(channel: Channel) -> None:
    """Returns once the channel holds bytes or its peer finished (checked when the task
    runs: bytes may have come since it was made)."""
    while not channel.buf and await channel.fill():
        pass


def _authority(target: str) -> tuple[str, int] | None:
    """host:port of a CONNECT request (IPv6 in brackets)."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        return None
    port = int(port_text)
    if not 0 < port < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port
