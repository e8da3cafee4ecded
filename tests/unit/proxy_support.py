"""Helpers of the egress proxy tests: a test CA, local upstream servers, raw HTTP clients.

Everything listens on 127.0.0.1 with ephemeral ports; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httptools
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flowtap.protocols.messages import Transaction
from flowtap.proxy import (
    CertificateAuthority,
    ConnectionEvent,
    EgressProxy,
    ProxyConfig,
    ProxyContext,
)
from flowtap.records.http import HttpRecordOptions

T = TypeVar("T")
LOCALHOST = "127.0.0.1"


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Runs a test on uvloop, the loop the sensor runs the proxy on (it differs from
    asyncio's in ways that matter: a second reader on one fd is an error there)."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())


@dataclass(frozen=True)
class UpstreamPki:
    """A CA (not flowtap's) and a server certificate it signed for localhost/127.0.0.1."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


def make_pki(directory: Path) -> UpstreamPki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test upstream CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pki = UpstreamPki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


# -- upstream HTTP/1.1 server ---------------------------------------------------------


@dataclass
class ReceivedRequest:
    method: str
    path: str
    body_size: int = 0
    body_sha256: str = ""


class _RequestCallbacks:
    def __init__(self) -> None:
        self.url = b""
        self.body = hashlib.sha256()
        self.size = 0
        self.done: list[tuple[str, int, str]] = []  # (path, size, sha256)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.update(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.done.append((self.url.decode(), self.size, self.body.hexdigest()))
        self.url, self.body, self.size = b"", hashlib.sha256(), 0


@dataclass
class Upstream:
    """Records the first ``keep`` raw bytes of each connection, answers by path:
    /download/N (N zero bytes, streamed), /chunked, /close (close-delimited), else a JSON
    description of the request."""

    keep: int = 1 << 20
    received: list[bytearray] = field(default_factory=list)
    requests: list[ReceivedRequest] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self, context: ssl.SSLContext | None = None) -> Upstream:
        self.server = await asyncio.start_server(self._handle, LOCALHOST, 0, ssl=context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = bytearray()
        self.received.append(raw)
        self.writers.add(writer)
        callbacks = _RequestCallbacks()
        parser = httptools.HttpRequestParser(callbacks)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                if len(raw) < self.keep:
                    raw += data[: self.keep - len(raw)]
                parser.feed_data(data)
                while callbacks.done:
                    path, size, digest = callbacks.done.pop(0)
                    method = parser.get_method().decode()
                    self.requests.append(ReceivedRequest(method, path, size, digest))
                    if not await self._respond(writer, method, path, size, digest):
                        return
        except (ConnectionError, httptools.HttpParserError):
            return
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _respond(
        self, writer: asyncio.StreamWriter, method: str, path: str, size: int, digest: str
    ) -> bool:
        if path.startswith("/download/"):
            total = int(path.rsplit("/", 1)[1])
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
            chunk = bytes(64 << 10)
            left = total
            while left:
                piece = chunk[: min(left, len(chunk))]
                writer.write(piece)
                left -= len(piece)
                await writer.drain()
            return True
        if path == "/chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            await writer.drain()
            return True
        if path == "/close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            await writer.drain()
            return False
        body = json.dumps(
            {"method": method, "path": path, "body_size": size, "body_sha256": digest}
        ).encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"X-Upstream: yes\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + (b"" if method == "HEAD" else body))
        await writer.drain()
        return True


# -- clients --------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.body)
        return out


async def read_response(
    reader: asyncio.StreamReader, *, discard_body: bool = False, method: str = "GET"
) -> Response:
    """One response (Content-Length, chunked or close-delimited body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [
        (name, value.strip()) for name, _, value in (line.partition(":") for line in lines[1:-2])
    ]
    resp = Response(status, headers, b"")
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return resp
    body = bytearray()
    length = resp.header("content-length")
    if resp.header("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    elif length is not None:
        left = int(length)
        while left:
            data = await reader.read(min(left, 1 << 16))
            if not data:
                raise EOFError("body cut short")
            left -= len(data)
            if not discard_body:
                body += data
    else:
        body += await reader.read()
    resp.body = bytes(body)
    return resp


async def exchange(
    port: int, request: bytes, *, context: ssl.SSLContext | None = None, sni: str | None = None
) -> Response:
    reader, writer = await asyncio.open_connection(
        LOCALHOST, port, ssl=context, server_hostname=sni if context else None
    )
    try:
        writer.write(request)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


@dataclass
class Recorder:
    transactions: list[tuple[Transaction, ProxyContext]] = field(default_factory=list)
    events: list[ConnectionEvent] = field(default_factory=list)

    def on_transaction(self, tx: Transaction, ctx: ProxyContext) -> None:
        self.transactions.append((tx, ctx))

    def on_connection(self, event: ConnectionEvent) -> None:
        self.events.append(event)

    def closes(self) -> list[ConnectionEvent]:
        return [e for e in self.events if e.event == "close"]

    async def wait_closes(self, count: int, timeout: float = 5.0) -> list[ConnectionEvent]:
        async with asyncio.timeout(timeout):
            while len(self.closes()) < count:
                await asyncio.sleep(0.01)
        return self.closes()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def gather_bounded(*aws: Awaitable[Any]) -> list[Any]:
    return list(await asyncio.gather(*aws))


CLIENT_PID = 4242  # what the injected attribution says of every client


@asynccontextmanager
async def proxied(
    ca: CertificateAuthority,
    destination: tuple[str, int],
    recorder: Recorder,
    config: ProxyConfig | None = None,
    *,
    upstream_ca: Path | None = None,
) -> AsyncIterator[EgressProxy]:
    """flowtap's proxy with every connection's original destination injected (no eBPF),
    capturing at level full unless ``config`` says otherwise."""
    config = config or ProxyConfig(http=HttpRecordOptions(level="full"))
    if upstream_ca is not None:
        config = replace(config, upstream_ca_file=str(upstream_ca))
    proxy = EgressProxy(
        config,
        ca,
        on_transaction=recorder.on_transaction,
        on_connection=recorder.on_connection,
        original_destination=lambda sock: destination,
        client_process=lambda peer: CLIENT_PID,
    )
    async with proxy:
        yield proxy


def transparent_port(proxy: EgressProxy) -> int:
    assert proxy.transparent_address is not None
    return proxy.transparent_address[1]
