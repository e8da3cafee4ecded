"""HTTPS/1.1 test server for the Java agent self-test: GET -> SIZE bytes, POST -> its length.

Usage: python3 https_server.py PORT CERT KEY SIZE (loopback only; stop it by its pid).
"""

import http.server
import ssl
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"g" * int(sys.argv[4])
        self._reply(body)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        self._reply(b"got %d" % len(self.rfile.read(n)))

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
