"""HTTPS peers for the TLS e2e tests: ``python tls_peer.py ROLE ...``.

server  HTTPS on 127.0.0.1 port 0 with --cert/--key; ALPN picks h2 (h2 library) or
        HTTP/1.1 (http.server), per connection. GET /items/N answers N bytes of
        body_bytes(N); POST answers 201 "echo:" + the request body, with a Set-Cookie.
        Prints "listening" with the port.
client  http.client over TLS (SSL_write_ex/SSL_read_ex in Python's _ssl): waits for --go,
        then sends each of --paths on one keep-alive connection with an X-Api-Key header
        (with --fork, from a forked child, which prints "child" and waits for --child-go);
        with --again FILE, waits
        for FILE and does it once more on a new connection.
        Prints "response" for each answer (status, body length), then "done".
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import socketserver
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import h2.config
import h2.connection
import h2.events

# Longer on a slower machine (a kernel-matrix guest: tests/kernels, helpers.TIMEOUT_SCALE).
LIFETIME_S = round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1")))


def say(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def body_bytes(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def answer(method: str, path: str, body: bytes) -> tuple[int, bytes, str]:
    if method == "POST":
        return 201, b"echo:" + body, "text/plain"
    return 200, body_bytes(int(path.rsplit("/", 1)[1])), "application/octet-stream"


class Http1Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        status, body, ctype = answer(method, self.path, self.rfile.read(length))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "session=abc123")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply("GET")

    def do_POST(self) -> None:
        self._reply("POST")


def serve_h2(sock: ssl.SSLSocket) -> None:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    requests: dict[int, tuple[dict[str, str], bytearray]] = {}
    while True:
        data = sock.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                requests[event.stream_id] = (dict(event.headers), bytearray())  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                requests[event.stream_id][1].extend(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                headers, body = requests.pop(event.stream_id)
                status, reply, ctype = answer(headers[":method"], headers[":path"], bytes(body))
                conn.send_headers(
                    event.stream_id,
                    [
                        (":status", str(status)),
                        ("content-type", ctype),
                        ("content-length", str(len(reply))),
                        ("set-cookie", "session=abc123"),
                    ],
                )
                conn.send_data(event.stream_id, reply, end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                sock.sendall(conn.data_to_send())
                return
        sock.sendall(conn.data_to_send())


class TlsServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), Http1Handler)
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        tls = self.context.wrap_socket(request, server_side=True)
        if tls.selected_alpn_protocol() == "h2":
            serve_h2(tls)
        else:
            Http1Handler(tls, client_address, self)
        # A close_notify before the close: clients such as s_client call a bare EOF an error.
        with contextlib.suppress(OSError, ValueError):
            tls.unwrap()


def server(args: argparse.Namespace) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    srv = TlsServer(context)
    say("listening", port=srv.server_address[1])
    srv.serve_forever()


def wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


def exchange(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(cafile=args.ca)
    conn = http.client.HTTPSConnection("127.0.0.1", args.port, context=context)
    for path in args.paths:
        conn.request("GET", path, headers={"X-Api-Key": "k-123"})
        response = conn.getresponse()
        body = response.read()
        say("response", path=path, status=response.status, length=len(body))
    conn.close()


def client(args: argparse.Namespace) -> None:
    if args.go:
        wait_for(args.go)
    if args.fork:
        # A forked child without exec does the exchange: it maps what its parent did.
        child = os.fork()
        if child == 0:
            say("child")
            if args.child_go:
                wait_for(args.child_go)
            exchange(args)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        if status != 0:
            sys.exit(f"child exited with status {status}")
    else:
        exchange(args)
    if args.again:
        wait_for(args.again)
        exchange(args)
    say("done")


def main() -> None:
    signal.alarm(LIFETIME_S)
    socket.setdefaulttimeout(LIFETIME_S)
    parser = argparse.ArgumentParser()
    roles = parser.add_subparsers(dest="role", required=True)
    srv = roles.add_parser("server")
    srv.add_argument("--cert", required=True)
    srv.add_argument("--key", required=True)
    cli = roles.add_parser("client")
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--ca", required=True)
    cli.add_argument("--paths", nargs="+", required=True)
    cli.add_argument("--go")
    cli.add_argument("--again")
    cli.add_argument("--fork", action="store_true")
    cli.add_argument("--child-go", help="with --fork: the child waits for this file")
    args = parser.parse_args()
    {"server": server, "client": client}[args.role](args)


if __name__ == "__main__":
    main()
