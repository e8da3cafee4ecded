"""DNS over UDP inside a network namespace made by the test: a stub server on
127.0.0.1:53 and three clients in one process (stdlib only; prints JSON status lines).

1. unconnected socket, sendto(); closed with close()
2. connected socket, send(); left open, so the process exit ends it
3. connected socket to 127.0.0.2:53 where nothing listens: ICMP port unreachable
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading

QUERY = (
    struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    + b"\x07example\x03com\x00"
    + struct.pack(">HH", 1, 1)
)
ANSWER = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 1])


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)


def serve(server: socket.socket) -> None:
    for _ in range(2):
        query, peer = server.recvfrom(512)
        # Same id and question, QR+RD+RA flags, one answer.
        reply = query[:2] + b"\x81\x80" + query[4:6] + b"\x00\x01\x00\x00\x00\x00"
        server.sendto(reply + query[12:] + ANSWER, peer)


def main() -> None:
    # Never outlive the test.
    signal.alarm(round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))))
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 53))
    threading.Thread(target=serve, args=(server,), daemon=True).start()

    unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unconnected.sendto(QUERY, ("127.0.0.1", 53))
    first = unconnected.recv(512)
    say("unconnected", port=unconnected.getsockname()[1], sent=len(QUERY), received=len(first))
    unconnected.close()

    connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected.connect(("127.0.0.1", 53))
    connected.send(QUERY)
    second = connected.recv(512)
    say("connected", port=connected.getsockname()[1], sent=len(QUERY), received=len(second))

    nobody = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    nobody.connect(("127.0.0.2", 53))
    nobody.send(QUERY)
    try:
        nobody.recv(512)
        outcome = "answered"
    except ConnectionRefusedError:
        outcome = "refused"
    say("nobody", port=nobody.getsockname()[1], outcome=outcome)
    nobody.close()
    # `connected` stays open: the process exit has to end its flow.
    os._exit(0)


if __name__ == "__main__":
    main()
