"""A small HTTP/1.1 server for the endpoints, bounded against bad clients.

Each connection gets one request and `Connection: close`. A client has REQUEST_TIMEOUT_S
in all to send its request head (a slowloris sending a byte a second is cut off, not
kept alive by each byte), at most MAX_REQUEST_BYTES of it, and at most MAX_CONNECTIONS
are served at once: one over is answered 503 and closed at once. Each connection is served
on a thread of its own, so a slow client delays nobody else's scrape; none of these threads
is the sensor's consumer."""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("flowtap")

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8 << 10
MAX_CONNECTIONS = 16
# How often the accept loop calls its tick (the readiness sampler) when idle.
TICK_S = 1.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


Handler = Callable[[str], Response]


def _text(status: int, message: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", (message + "\n").encode())


class EndpointServer:
    """Accepts on its own thread; `handler(path)` answers GET and HEAD requests."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: Handler,
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        self._handler = handler
        self._tick = tick
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind(address)
            self._socket.listen(64)
            self._socket.setblocking(False)
        except OSError:
            self._socket.close()
            raise
        self.address: tuple[str, int] = self._socket.getsockname()[:2]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stop = threading.Event()
        # stop() wakes the accept loop at once, rather than at its next tick.
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="flowtap-httpd", daemon=True)
        self.refused = 0  # connections over MAX_CONNECTIONS
        self.timed_out = 0  # clients that did not send a request head in time

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=2 * TICK_S)
        self._socket.close()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self) -> None:
        next_tick = 0.0
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    self._run_tick()
                    next_tick = now + TICK_S
                if not selector.select(timeout=min(TICK_S, max(next_tick - now, 0.0))):
                    continue
                if self._stop.is_set():
                    return
                try:
                    client, _peer = self._socket.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:  # out of descriptors: try again later
                    log.warning("endpoints: accept failed: %s", exc)
                    time.sleep(0.1)
                    continue
                self._admit(client)

    def _run_tick(self) -> None:
        try:
            self._tick()
        except Exception:  # a bug there must not end the endpoints
            log.exception("endpoints: the readiness sampler failed")

    def _admit(self, client: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            with contextlib.suppress(OSError):
                client.setblocking(False)
                # What already arrived is read (closing with unread data would reset
                # the connection before the client reads the answer).
                client.recv(MAX_REQUEST_BYTES)
            with contextlib.suppress(OSError):
                client.send(_encode(_text(503, "too many connections to the endpoints"), False))
                client.shutdown(socket.SHUT_WR)
            client.close()
            return
        try:
            threading.Thread(
                target=self._connection, args=(client,), name="flowtap-httpd-conn", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had
            self._slots.release()
            client.close()

    def _connection(self, client: socket.socket) -> None:
        try:
            with client:
                response, head_only = self._answer(client)
                client.settimeout(REQUEST_TIMEOUT_S)
                client.sendall(_encode(response, head_only))
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client went away or stopped reading: nothing to tell it
        finally:
            self._slots.release()

    def _answer(self, client: socket.socket) -> tuple[Response, bool]:
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_REQUEST_BYTES:
                return _text(431, f"a request head is at most {MAX_REQUEST_BYTES} bytes"), False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out += 1
                return _text(408, "the request head took too long"), False
            client.settimeout(remaining)
            try:
                chunk = client.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionAbortedError("closed before a whole request")
            data += chunk
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _text(400, "not an HTTP/1.x request line"), False
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            return _text(405, "only GET and HEAD"), False
        path = target.split("?", 1)[0]
        try:
            return self._handler(path), method == "HEAD"
        except Exception as exc:  # a bug in one endpoint: say so, keep serving
            log.exception("endpoints: %s failed", path)
            return _text(503, f"{path} failed: {exc}"), False


def _encode(response: Response, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + response.body
