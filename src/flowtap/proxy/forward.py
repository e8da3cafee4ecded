"""HTTP/1.x forwarding on one client connection: request by request, bodies streamed.

Each request head is checked (proxy/h1.py) and forwarded byte for byte; bodies are streamed
in pieces as they arrive, never held whole, with backpressure both ways. What is relayed
is shown to the connection's capture (the passive parsers) per direction. Requests we refuse
are answered here (400, 408, 431, 502) and the connection closes after the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from flowtap.proxy.capture import Capture
from flowtap.proxy.channel import Channel, ChannelClosedError, describe_error
from flowtap.proxy.events import ProxyContext, ProxyStats
from flowtap.proxy.h1 import (
    HttpError,
    RequestHead,
    ResponseHead,
    UpstreamError,
    error_response,
    parse_chunk_size,
    parse_request_head,
    parse_response_head,
)
from flowtap.proxy.relay import relay

__all__ = ["Connector", "Http1Forwarder", "Limits"]

log = logging.getLogger("flowtap.proxy")

Connector = Callable[[str, int], Awaitable[Channel]]

_MAX_CHUNK_LINE = 4096
_MAX_TRAILER_BYTES = 16 << 10
_EXPECT_WAIT = 1.0  # how long to wait for 100 Continue before sending the body anyway


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 64 << 10
    max_headers: int = 100
    header_timeout: float = 10.0  # a request head must arrive whole within this (from its 1st byte)
    idle_timeout: float = 60.0  # keep-alive wait for the next request; body inactivity
    upstream_connect_timeout: float = 10.0
    upstream_response_timeout: float = 60.0  # request sent -> whole response head
    relay_idle_timeout: float = 600.0  # tunnels (upgrades, raw relays): both ways idle


class _ClientGoneError(Exception):
    """The client closed or reset the connection."""


class _UpstreamGoneError(Exception):
    """The upstream closed, reset or stalled."""


async def _fill(ch: Channel, timeout: float) -> bool:
    async with asyncio.timeout(timeout):
        return await ch.fill()


class Http1Forwarder:
    """Serves one client connection. ``upstream`` is an already open upstream (TLS
    interception: opened before the client's handshake, to learn the ALPN), else the
    connector opens one at the first request; ``upstream_error`` makes every request a 502.
    ``explicit``: requests are in absolute form (HTTP_PROXY) and name their own upstream."""

    def __init__(  # noqa: PLR0917
        self,
        client: Channel,
        ctx: ProxyContext,
        stats: ProxyStats,
        limits: Limits,
        connect: Connector,
        capture: Capture | None,
        *,
        explicit: bool = False,
        upstream: Channel | None = None,
        upstream_error: str | None = None,
    ) -> None:
        self.client = client
        self.ctx = ctx
        self.stats = stats
        self.limits = limits
        self.connect = connect
        self.capture = capture
        self.explicit = explicit
        self.upstream = upstream
        self.upstream_key = ctx.destination if upstream is not None else None
        self.upstream_error = upstream_error
        self.from_client = 0
        self.to_client = 0
        self.error: str | None = None  # why the connection ended early
        self.upstream_failed = False
        self._answering = False  # bytes of the current response went to the client

    # -- taps -------------------------------------------------------------------------

    def _sent_up(self, data: bytes) -> None:
        self.from_client += len(data)
        if self.capture is not None:
            self.capture.client(data)

    def _sent_down(self, data: bytes) -> None:
        self.to_client += len(data)
        if self.capture is not None:
            self.capture.server(data)

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while await self._exchange():
                pass
        except _ClientGoneError:
            self.error = self.error or "client closed the connection mid-request"
        except (ChannelClosedError, ConnectionError) as exc:
            self.error = self.error or f"connection lost: {exc}"
        finally:
            if self.upstream is not None:
                self.upstream.close()
            self.client.close()

    async def _refuse(
        self, status: int, detail: str, *, record: bool = False, request: bytes | None = None
    ) -> bool:
        """Answer with an error and end the connection (returns False for the loop).
        ``record``: show the answer to the capture (a 502 is a transaction to record; a
        refused request is not), with ``request`` if it was not shown yet."""
        self.error = detail
        answer = error_response(status, detail)
        if record and request is not None and self.capture is not None:
            self.capture.client(request)
        try:
            self.client.write(answer)
            if record:
                self._sent_down(answer)
            else:
                self.to_client += len(answer)
            async with asyncio.timeout(5.0):
                await self.client.drain()
        except (ChannelClosedError, TimeoutError, ConnectionError):
            pass
        return False

    async def _exchange(self) -> bool:
        """One request and its response; True when the connection may serve another."""
        self._answering = False
        try:
            raw = await self._read_request_head()
        except HttpError as exc:
            self._count_refusal(exc)
            return await self._refuse(exc.status, exc.detail)
        if raw is None:
            return False
        try:
            head = parse_request_head(raw, self.limits.max_headers)
        except HttpError as exc:
            self._count_refusal(exc)
            return await self._refuse(exc.status, exc.detail)
        self.stats.requests += 1
        if head.method == "CONNECT":
            self.stats.refused_bad_request += 1
            return await self._refuse(400, "CONNECT is only accepted as the first request")
        try:
            host, port, out = self._route(head)
        except HttpError as exc:
            self._count_refusal(exc)
            return await self._refuse(exc.status, exc.detail)
        upstream = await self._upstream(host, port)
        if upstream is None:
            return await self._bad_gateway(raw)
        try:
            upstream.write(out)
        except ChannelClosedError:
            return await self._bad_gateway(raw, "upstream closed the connection")
        self._sent_up(raw)
        try:
            response = await self._request_body_and_response(head, upstream)
        except HttpError as exc:  # bad chunked framing in the request body
            self._count_refusal(exc)
            return await self._refuse(exc.status, exc.detail)
        except UpstreamError as exc:
            self.stats.upstream_bad_response += 1
            return await self._bad_gateway(None, f"invalid response from upstream: {exc}")
        except _UpstreamGoneError as exc:
            return await self._bad_gateway(None, str(exc))
        if response is None:
            return False
        return await self._response_body(head, response, upstream)

    def _count_refusal(self, exc: HttpError) -> None:
        if exc.kind == "timeout":
            pass  # counted where it happened
        elif exc.status == 431:
            self.stats.refused_header_too_large += 1
        elif exc.status == 408:
            self.stats.timeouts_header += 1
        elif exc.kind == "smuggling":
            self.stats.refused_smuggling += 1
        else:
            self.stats.refused_bad_request += 1

    async def _bad_gateway(self, request: bytes | None, detail: str | None = None) -> bool:
        reason = detail or self.upstream_error or "upstream unavailable"
        self.stats.responses_502 += 1
        self.upstream_failed = True
        if self._answering:
            # Part of a response went out already: a 502 would corrupt it. Just close.
            self.error = reason
            return False
        return await self._refuse(502, reason, record=True, request=request)

    # -- request side -----------------------------------------------------------------

    async def _read_request_head(self) -> bytes | None:
        """The next request head, None at a clean end (EOF or idle keep-alive)."""
        ch = self.client
        # Stray CRLFs between requests (after a body) are ignored (RFC 9112 §2.2).
        while ch.buf[:2] == b"\r\n":
            del ch.buf[:2]
        try:
            while not ch.buf:
                if not await _fill(ch, self.limits.idle_timeout):
                    return None
                while ch.buf[:2] == b"\r\n":
                    del ch.buf[:2]
        except TimeoutError:
            self.stats.timeouts_idle += 1
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.header_timeout
        limit = self.limits.max_header_bytes
        scanned = 0
        while True:
            end = ch.buf.find(b"\r\n\r\n", max(0, scanned - 3))
            if end >= 0:
                if end + 4 > limit:
                    break
                head = ch.take(end + 4)
                return head
            scanned = len(ch.buf)
            if scanned > limit:
                break
            try:
                async with asyncio.timeout_at(deadline):
                    more = await ch.fill()
            except TimeoutError:
                raise HttpError(
                    408, f"request head not received within {self.limits.header_timeout}s"
                ) from None
            if not more:
                raise _ClientGoneError
        raise HttpError(431, f"request header section over {limit} bytes", "header_too_large")

    def _route(self, head: RequestHead) -> tuple[str, int, bytes]:
        """Where the request goes, and the bytes to send there."""
        if not self.explicit:
            host, port = self.ctx.destination
            return host, port, head.raw
        if not head.target.lower().startswith("http://"):
            raise HttpError(400, "not a proxy request: expected an absolute http:// URL")
        try:
            url = urlsplit(head.target)
            hostname, port = url.hostname, url.port or 80
        except ValueError:
            raise HttpError(400, "malformed absolute URL") from None
        if not hostname:
            raise HttpError(400, "absolute URL without a host")
        host = hostname
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        # Only the request line changes (origin-form for the origin server); headers and
        # body go as sent.
        line = f"{head.method} {path} HTTP/{head.version}\r\n".encode("ascii")
        self.ctx.destination = (host, port)
        return host, port, line + head.raw[head.request_line_len :]

    async def _upstream(self, host: str, port: int) -> Channel | None:
        up = self.upstream
        if up is not None and self.upstream_key == (host, port) and not up.eof:
            return up
        if up is not None:
            up.close()
            self.upstream = None
        if self.upstream_error is not None and self.upstream_key is None and not self.explicit:
            return None  # the first connect already failed (TLS interception)
        try:
            up = await self.connect(host, port)
        except TimeoutError:
            self.stats.timeouts_upstream += 1
            self.upstream_error = f"upstream {host}:{port} did not connect in time"
            return None
        except Exception as exc:  # refused, unreachable, TLS verification...
            self.upstream_error = f"upstream {host}:{port}: {describe_error(exc)}"
            return None
        self.upstream, self.upstream_key, self.upstream_error = up, (host, port), None
        return up

    async def _request_body_and_response(
        self, head: RequestHead, upstream: Channel
    ) -> ResponseHead | None:
        response: ResponseHead | None = None
        if head.expect_continue:
            try:
                response = await self._read_response_head(head, upstream, _EXPECT_WAIT)
            except TimeoutError:
                response = None  # no 100 Continue: send the body anyway
            if response is not None and response.status >= 200:
                head.keep_alive = False  # the client may or may not send the body now
                return response
            response = None
        await self._request_body(head, upstream)
        return await self._read_response_head(head, upstream, None)

    async def _request_body(self, head: RequestHead, upstream: Channel) -> None:
        if head.framing == "length":
            await self._pump_length(self.client, upstream, head.content_length, up=True)
        elif head.framing == "chunked":
            await self._pump_chunked(self.client, upstream, up=True)

    # -- response side ----------------------------------------------------------------

    async def _read_response_head(
        self, head: RequestHead, upstream: Channel, wait: float | None
    ) -> ResponseHead:
        """The next final response head; 1xx (but 101) are forwarded on the way.
        ``wait``: give up with TimeoutError if nothing arrives that soon (100-continue)."""
        loop = asyncio.get_running_loop()
        limit = self.limits.max_header_bytes
        while True:
            timeout = wait if wait is not None else self.limits.upstream_response_timeout
            deadline = loop.time() + timeout
            scanned = 0
            while True:
                end = upstream.buf.find(b"\r\n\r\n", max(0, scanned - 3))
                if end >= 0:
                    break
                scanned = len(upstream.buf)
                if scanned > limit:
                    raise UpstreamError(f"response head over {limit} bytes")
                try:
                    async with asyncio.timeout_at(deadline):
                        more = await upstream.fill()
                except TimeoutError:
                    if wait is not None and scanned == 0:
                        raise
                    self.stats.timeouts_upstream += 1
                    raise _UpstreamGoneError(
                        f"no response from upstream within {timeout}s"
                    ) from None
                if not more:
                    raise _UpstreamGoneError("upstream closed the connection before responding")
            raw = upstream.take(end + 4)
            response = parse_response_head(raw, self.limits.max_headers, head.method)
            await self._to_client(raw)
            if 100 <= response.status < 200 and response.status != 101:
                if wait is not None:
                    return response  # 100 Continue: now the body
                continue
            return response

    async def _to_client(self, data: bytes) -> None:
        self._answering = True
        self.client.write(data)
        self._sent_down(data)
        await self.client.drain()

    async def _response_body(
        self, head: RequestHead, response: ResponseHead, upstream: Channel
    ) -> bool:
        if response.status == 101 or (head.upgrade and response.status == 101):
            # An upgrade (WebSocket...): from here on, bytes both ways.
            await relay(
                self.client,
                upstream,
                self._sent_up,
                self._sent_down,
                idle_timeout=self.limits.relay_idle_timeout,
            )
            return False
        try:
            if response.framing == "length":
                await self._pump_length(upstream, self.client, response.content_length, up=False)
            elif response.framing == "chunked":
                await self._pump_chunked(upstream, self.client, up=False)
            elif response.framing == "close":
                await self._pump_to_eof(upstream, self.client)
                return False
        except (_UpstreamGoneError, HttpError) as exc:
            self.error = f"upstream response body: {exc}"
            self.upstream_failed = True
            return False
        return head.keep_alive and response.keep_alive and not self.client.eof

    # -- body pumps -------------------------------------------------------------------

    def _eof(self, up: bool) -> Exception:
        return (
            _ClientGoneError()
            if up
            else _UpstreamGoneError("upstream closed inside a response body")
        )

    async def _more(self, src: Channel, up: bool) -> None:
        try:
            more = await _fill(src, self.limits.idle_timeout)
        except TimeoutError:
            self.stats.timeouts_idle += 1
            if up:
                raise HttpError(408, "request body stalled", "timeout") from None
            raise _UpstreamGoneError("upstream response body stalled") from None
        if not more:
            raise self._eof(up)

    async def _forward(self, dst: Channel, data: bytes, up: bool) -> None:
        dst.write(data)
        if up:
            self._sent_up(data)
        else:
            self._sent_down(data)
        await dst.drain()

    async def _pump_length(self, src: Channel, dst: Channel, left: int, *, up: bool) -> None:
        while left > 0:
            if not src.buf:
                await self._more(src, up)
            data = src.take(left)
            left -= len(data)
            await self._forward(dst, data, up)

    async def _read_line(self, src: Channel, up: bool, what: str) -> bytes:
        scanned = 0
        while True:
            end = src.buf.find(b"\n", scanned)
            if end >= 0:
                return src.take(end + 1)
            scanned = len(src.buf)
            if scanned > _MAX_CHUNK_LINE:
                raise HttpError(400, f"{what} longer than {_MAX_CHUNK_LINE} bytes", "smuggling")
            await self._more(src, up)

    async def _pump_chunked(self, src: Channel, dst: Channel, *, up: bool) -> None:
        while True:
            line = await self._read_line(src, up, "chunk size line")
            try:
                size = parse_chunk_size(line)
            except ValueError as exc:
                raise HttpError(400, str(exc), "smuggling") from None
            await self._forward(dst, line, up)
            if size == 0:
                break
            await self._pump_length(src, dst, size, up=up)
            while len(src.buf) < 2:
                await self._more(src, up)
            if src.buf[:2] != b"\r\n":
                raise HttpError(400, "chunk data not followed by CRLF", "smuggling")
            await self._forward(dst, src.take(2), up)
        trailers = 0
        while True:
            line = await self._read_line(src, up, "trailer line")
            trailers += len(line)
            if not line.endswith(b"\r\n") or b"\r" in line[:-2] or line[:1] in (b" ", b"\t"):
                raise HttpError(400, "malformed trailer section", "smuggling")
            if trailers > _MAX_TRAILER_BYTES:
                raise HttpError(431, "trailer section too large", "header_too_large")
            await self._forward(dst, line, up)
            if line == b"\r\n":
                return

    async def _pump_to_eof(self, src: Channel, dst: Channel) -> None:
        while True:
            if not src.buf:
                try:
                    if not await _fill(src, self.limits.idle_timeout):
                        break
                except TimeoutError:
                    self.stats.timeouts_idle += 1
                    break
            await self._forward(dst, src.take(len(src.buf)), up=False)
        dst.write_eof()
