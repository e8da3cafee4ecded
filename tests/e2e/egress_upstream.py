"""Upstream servers for the egress e2e tests, run inside the test host's namespace:
``python egress_upstream.py --host IP [--host6 IP6] --cert C --key K``.

HTTP/1.1 on port 8080, and HTTPS on 8443 (ALPN h2 or http/1.1, the h2 library for h2).
Every request is printed as it arrived ("request": raw bytes in base64 for HTTP/1.x,
the header list and body for h2). Answers: POST -> 201 "echo:" + body; GET /big/N -> N
bytes; other GET -> 200 "hello " + path. Prints "listening" once both are up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import sys

import h2.config
import h2.connection
import h2.events

HTTP_PORT = 8080
HTTPS_PORT = 8443
# Longer on a slower machine (a kernel-matrix guest: tests/kernels, helpers.TIMEOUT_SCALE).
LIFETIME_S = round(60 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1")))


def say(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
    if method == "POST":
        return 201, b"echo:" + body
    if path.startswith("/big/"):
        return 200, bytes(i % 251 for i in range(int(path[5:])))
    return 200, b"hello " + path.encode()


async def read_body(
    reader: asyncio.StreamReader, length: int, chunked: bool
) -> tuple[bytes, bytes]:
    """(the body's bytes as they came, its content)."""
    if not chunked:
        whole = await reader.readexactly(length) if length else b""
        return whole, whole
    raw, body = bytearray(), bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        size = int(line.split(b";")[0], 16)
        if size == 0:
            raw += await reader.readuntil(b"\r\n")  # no trailers here: the final CRLF
            return bytes(raw), bytes(body)
        chunk = await reader.readexactly(size + 2)
        raw += chunk
        body += chunk[:-2]


async def serve_h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool) -> None:
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length, chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "transfer-encoding":
                chunked = value.strip().lower() == "chunked"
        raw, body = await read_body(reader, length, chunked)
        say("request", tls=tls, raw=base64.b64encode(head + raw).decode())
        status, reply = answer(method, path, body)
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(reply)}\r\n\r\n".encode()
            + reply
        )
        await writer.drain()
    writer.close()


async def serve_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    requests: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
    while data := await reader.read(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = [(k.decode(), v.decode()) for k, v in event.headers]
                requests[event.stream_id] = (headers, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                requests[event.stream_id][1].extend(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                headers, body = requests.pop(event.stream_id)
                fields = dict(headers)
                say("request", tls=True, h2=True, headers=headers, body=body.decode())
                status, reply = answer(fields[":method"], fields[":path"], bytes(body))
                conn.send_headers(
                    event.stream_id,
                    [(":status", str(status)), ("content-length", str(len(reply)))],
                )
                conn.send_data(event.stream_id, reply, end_stream=True)
        writer.write(conn.data_to_send())
        await writer.drain()
    writer.close()


async def serve_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
        await serve_h2(reader, writer)
    else:
        await serve_h1(reader, writer, tls=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--host6", help="also listen on this IPv6 address")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    hosts = [args.host, args.host6] if args.host6 else [args.host]
    plain = await asyncio.start_server(lambda r, w: serve_h1(r, w, tls=False), hosts, HTTP_PORT)
    secure = await asyncio.start_server(serve_tls, hosts, HTTPS_PORT, ssl=context)
    say("listening")
    async with plain, secure:
        await asyncio.sleep(LIFETIME_S)


if __name__ == "__main__":
    asyncio.run(main())
