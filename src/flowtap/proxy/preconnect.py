"""The upstream TCP connection of a redirected client, opened as soon as it is accepted.

While the proxy waits for the client's first bytes (a ClientHello, a request line), the
connection to the original destination is already being made. A server that speaks first
(SMTP, MySQL, FTP...) is then heard at once and the connection relayed, instead of after
the sniff timeout; and whatever carries the client's protocol (TLS, HTTP, a raw relay)
takes this connection rather than opening another, so the upstream sees exactly one
connection per client connection, as it would without the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import Any

__all__ = ["Preconnected"]


class Preconnected:
    def __init__(self, destination: tuple[str, int], timeout: float) -> None:
        self._destination = destination
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._taken = False
        self._task: asyncio.Task[socket.socket] = asyncio.ensure_future(self._connect())

    async def _connect(self) -> socket.socket:
        host, port = self._destination
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            try:
                family = (
                    socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
                )
                address: tuple[Any, ...] = (host, port)
            except ValueError:  # a name (CONNECT host:port): resolved here
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
        self._sock = sock
        return sock

    async def server_spoke(self) -> None:
        """Returns once the upstream has sent bytes before the client did; raises when the
        connection could not be made (the caller then waits for the client alone)."""
        sock = await asyncio.shield(self._task)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())

    async def take(self) -> socket.socket | None:
        """The connected socket, handed over once (None after that: connect anew).
        Raises what the connect raised."""
        if self._taken:
            return None
        self._taken = True
        sock = await self._task
        self._sock = None  # the caller owns it now
        return sock

    def close(self) -> None:
        """Drops the connection if nobody took it (the client left without a word)."""
        if not self._task.done():
            self._task.cancel()
        elif self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(asyncio.CancelledError, Exception):
            if self._task.done():
                self._task.exception()  # retrieved: no "never retrieved" warning
