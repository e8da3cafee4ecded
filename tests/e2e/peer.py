"""The processes the e2e tests trace: loopback server, client, process trees.

Run as a script (standard library only): ``python peer.py ROLE ...``. Each prints JSON
status lines on stdout that the test reads live, and kills itself after LIFETIME_S
whatever it is waiting for. The roles:

server  Binds HOST port 0, prints "listening" with the port, then serves CONNECTIONS
        connections one after the other, accepting in a worker thread (so the test can
        check the accepting thread's id). raw mode reads exactly --read bytes and replies
        --reply bytes of pattern(); http mode reads a request head and replies a minimal
        HTTP/1.1 response with a --reply byte body. Then prints "replied" (peer address,
        counts, tid), reads until the peer closes, closes, and prints "served" (with
        --reset-after FILE: waits for FILE and aborts the connection with a RST instead).
        stall mode listens with backlog 0 and never accepts; close mode accepts each
        connection and closes it at once (for many clients at a time), printing nothing.
client  Connects (blocking connect() unless --how nonblock), sends --send bytes of
        pattern() the way --how says, reads exactly --expect bytes, then closes. Prints
        "connected" (local address, tid), "exchanged" (counts), "done". --how refused,
        timeout or abort: a connect that fails (prints "connect_failed" with the errno)
        or is closed while pending.
parent  PARENT GO URL CHILD_ARGV...: starts CHILD_ARGV at once (a descendant that exists
        before the sensor does), waits for GO, then runs curl on URL; prints "child" and
        "curl" with their pids, then "done".
holder  Opens --connections connections to PORT, all held open, printing "connected"
        for each; waits for --hold FILE, closes them with --pause seconds between, and
        prints "done".
forker  Forks children at a steady pace until GO exists; then each child connects once
        to PORT and exits. Prints "forked" with each child's pid, then "done".
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

# Longer on a slower machine (a kernel-matrix guest: tests/kernels, helpers.TIMEOUT_SCALE).
LIFETIME_S = round(30 * float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1")))
CURL = "/usr/bin/curl"
# Uneven buffers for sendmsg/writev: several iovecs, none a multiple of another.
SPLITS = (1, 100, 4093, 65536 + 17)


def say(event: str, **fields: object) -> None:
    """One JSON status line on stdout, flushed at once."""
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def pattern(size: int) -> bytes:
    """`size` bytes of 00 01 02 ... ff 00 01 ...: the sensor guesses l7 "other" for it."""
    block = bytes(range(256))
    return (block * (size // len(block) + 1))[:size]


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def recv_exact(conn: socket.socket, size: int) -> int:
    """Reads exactly `size` bytes (fewer only at EOF); returns how many."""
    got = 0
    while got < size:
        chunk = conn.recv(min(1 << 16, size - got))
        if not chunk:
            break
        got += len(chunk)
    return got


def recv_until_eof(conn: socket.socket) -> int:
    got = 0
    while chunk := conn.recv(1 << 16):
        got += len(chunk)
    return got


def wait_for_file(path: str) -> None:
    deadline = time.monotonic() + LIFETIME_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


# --- server --------------------------------------------------------------------------


def http_exchange(conn: socket.socket, body_size: int) -> tuple[int, int]:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        head += chunk
    body = b"x" * body_size
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + b"Connection: close\r\n\r\n"
        + body
    )
    conn.sendall(reply)
    return len(head), len(reply)


def accept_plain(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """accept(2) itself (Python's own accept uses accept4)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.accept(listener.fileno(), None, None)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "accept")
    conn = socket.socket(fileno=fd)
    return conn, conn.getpeername()


def serve(listener: socket.socket, args: argparse.Namespace) -> None:
    for _ in range(args.connections):
        conn, peer = accept_plain(listener) if args.plain_accept else listener.accept()
        if args.mode == "close":
            conn.close()
            continue
        with conn:
            if args.mode == "http":
                received, sent = http_exchange(conn, args.reply)
            else:
                received = recv_exact(conn, args.read)
                reply = pattern(args.reply)
                conn.sendall(reply)
                sent = len(reply)
            where = {"peer_ip": peer[0], "peer_port": peer[1], "tid": threading.get_native_id()}
            say("replied", received=received, sent=sent, **where)
            if args.reset_after:
                # Abortive close: SO_LINGER 0 makes close() send a RST, not a FIN.
                wait_for_file(args.reset_after)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                received += recv_until_eof(conn)
        say("served", received=received, sent=sent, **where)


def server(args: argparse.Namespace) -> None:
    with socket.socket(family_of(args.host), socket.SOCK_STREAM) as listener:
        listener.bind((args.host, 0))
        if args.mode == "stall":
            # Backlog 0: one connection fills the accept queue, nobody accepts it, and
            # the SYNs of any further connect() are dropped (it stays in SYN_SENT).
            listener.listen(0)
            say("listening", port=listener.getsockname()[1])
            time.sleep(LIFETIME_S)
            return
        listener.listen(1024 if args.mode == "close" else 16)
        say("listening", port=listener.getsockname()[1])
        worker = threading.Thread(target=serve, args=(listener, args))
        worker.start()
        worker.join()
    say("exiting")


# --- client --------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def tls_client_hello(server_name: str) -> bytes:
    """The ClientHello Python's ssl (OpenSSL) sends for server_name, without a server."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def dns_query(name: str) -> bytes:
    """A DNS-over-TCP query (2-byte length prefix) for the A record of name."""
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    message = header + labels + struct.pack("!HH", 1, 1)
    return struct.pack("!H", len(message)) + message


def first_bytes(kind: str, size: int) -> bytes:
    """What the client sends: pattern(size), or the opening of a known protocol."""
    if kind == "tls":
        return tls_client_hello("flowtap.example")
    if kind == "http2":
        return H2_PREFACE + H2_EMPTY_SETTINGS
    if kind == "dns":
        return dns_query("flowtap.example")
    return pattern(size)


def split(payload: bytes) -> list[bytes]:
    """`payload` as several buffers (the last one takes the remainder)."""
    parts, start = [], 0
    for size in SPLITS:
        parts.append(payload[start : start + size])
        start += size
    parts.append(payload[start:])
    return [part for part in parts if part]


def send_vectored(sock: socket.socket, payload: bytes, *, use_writev: bool) -> None:
    """sendmsg or writev with several buffers, resuming after partial writes."""
    buffers = [memoryview(part) for part in split(payload)]
    while buffers:
        sent = os.writev(sock.fileno(), buffers) if use_writev else sock.sendmsg(buffers)
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers[0])
            buffers.pop(0)
        if buffers and sent:
            buffers[0] = buffers[0][sent:]


def send_file(sock: socket.socket, payload: bytes) -> None:
    with tempfile.TemporaryFile() as file:
        file.write(payload)
        file.flush()
        file.seek(0)
        sent = sock.sendfile(file)
    if sent != len(payload):
        raise RuntimeError(f"sendfile sent {sent} of {len(payload)} bytes")


def connect_nonblocking(sock: socket.socket, address: tuple[str, int]) -> None:
    sock.setblocking(False)
    code = sock.connect_ex(address)
    say("connect_ex", code=code, name=errno.errorcode.get(code, str(code)))
    if code not in (0, errno.EINPROGRESS):
        raise OSError(code, os.strerror(code))
    _, writable, _ = select.select([], [sock], [], LIFETIME_S)
    if not writable:
        raise TimeoutError("non-blocking connect did not complete")
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))
    sock.setblocking(True)


def client(args: argparse.Namespace) -> None:
    if args.go:
        wait_for_file(args.go)
    if args.in_thread:
        worker = threading.Thread(target=connections, args=(args,))
        worker.start()
        worker.join()
    else:
        connections(args)


def connections(args: argparse.Namespace) -> None:
    for _ in range(args.repeat):
        connection(args)


def failing_connect(args: argparse.Namespace) -> None:
    """--how refused|timeout|abort: connections that never carry data."""
    address = (args.host, args.port)
    with socket.socket(family_of(args.host), socket.SOCK_STREAM) as sock:
        if args.how == "abort":
            # A non-blocking connect, closed while the handshake is still pending.
            sock.setblocking(False)
            code = sock.connect_ex(address)
            say("connect_ex", code=code, name=errno.errorcode.get(code, str(code)))
            return
        if args.how == "timeout":
            # One SYN retransmission, then ETIMEDOUT (about 3 s) instead of two minutes.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
        try:
            sock.connect(address)  # blocking
        except OSError as exc:
            say("connect_failed", errno=exc.errno, name=errno.errorcode.get(exc.errno or 0))
            return
    raise SystemExit(f"connect to {address} did not fail")


def connection(args: argparse.Namespace) -> None:
    if args.how in ("refused", "timeout", "abort"):
        failing_connect(args)
        return
    address = (args.host, args.port)
    with socket.socket(family_of(args.host), socket.SOCK_STREAM) as sock:
        if args.how == "nonblock":
            connect_nonblocking(sock, address)
        else:
            sock.connect(address)  # blocking: connect() itself returns 0
        local = sock.getsockname()
        say("connected", local_ip=local[0], local_port=local[1], tid=threading.get_native_id())
        payload = first_bytes(args.protocol, args.send)
        if args.how in ("sendmsg", "writev"):
            send_vectored(sock, payload, use_writev=args.how == "writev")
        elif args.how == "sendfile":
            send_file(sock, payload)
        else:
            sock.sendall(payload)
        if args.half_close:
            # Our FIN goes first; read the reply only once the server has closed as well.
            # A server that aborts may beat us to it: its RST already ended our side.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            wait_for_file(args.half_close)
        received = recv_exact(sock, args.expect)
        say("exchanged", sent=len(payload), received=received)
        if args.hold:
            wait_for_file(args.hold)
    say("done")


# --- holder --------------------------------------------------------------------------


def holder(args: argparse.Namespace) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(args.connections):
            sock = socket.socket(family_of(args.host), socket.SOCK_STREAM)
            held.append(sock)
            sock.connect((args.host, args.port))
            say("connected", local_port=sock.getsockname()[1])
        wait_for_file(args.hold)
        for sock in held:
            sock.close()
            time.sleep(args.pause)
    finally:
        for sock in held:
            sock.close()
    say("done")


# --- parent --------------------------------------------------------------------------


def parent(args: argparse.Namespace) -> None:
    child = subprocess.Popen(args.child_argv)
    say("child", child_pid=child.pid)
    wait_for_file(args.go)
    curl_argv = [CURL, "-sS", "--noproxy", "*", "--max-time", "10", "-o", "/dev/null", args.url]
    curl = subprocess.Popen(curl_argv)
    say("curl", curl_pid=curl.pid)
    say("done", curl_rc=curl.wait(timeout=LIFETIME_S), child_rc=child.wait(timeout=LIFETIME_S))


# --- forker --------------------------------------------------------------------------


def forker(args: argparse.Namespace) -> None:
    """Forks a child every --interval seconds until GO exists (at most --max). Each child
    blocks on a pipe; once the parent stops forking it closes the pipe, and every child
    makes one connection to 127.0.0.1:PORT (refused is fine) and exits."""
    gate_read, gate_write = os.pipe()
    children: list[int] = []
    while not os.path.exists(args.go) and len(children) < args.max:
        pid = os.fork()
        if pid == 0:
            os.close(gate_write)
            os.read(gate_read, 1)  # EOF once the parent closes its end
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", args.port)).close()
            os._exit(0)
        children.append(pid)
        say("forked", child_pid=pid)
        time.sleep(args.interval)
    os.close(gate_write)
    for pid in children:
        os.waitpid(pid, 0)
    say("done", children=len(children))


def main() -> None:
    signal.alarm(LIFETIME_S)  # default action: terminate; no peer outlives its test
    parser = argparse.ArgumentParser()
    roles = parser.add_subparsers(dest="role", required=True)
    srv = roles.add_parser("server")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--mode", choices=("raw", "http", "stall", "close"), default="raw")
    srv.add_argument("--read", type=int, default=0)
    srv.add_argument("--reply", type=int, default=0)
    srv.add_argument("--connections", type=int, default=1)
    srv.add_argument("--plain-accept", action="store_true", help="accept(2), not accept4(2)")
    srv.add_argument("--reset-after", metavar="FILE", help="after replying, wait, send a RST")
    cli = roles.add_parser("client")
    cli.add_argument("--host", default="127.0.0.1")
    cli.add_argument("--port", type=int, required=True)
    hows = ("sendall", "sendmsg", "writev", "sendfile", "nonblock", "refused", "timeout", "abort")
    cli.add_argument("--how", choices=hows, default="sendall")
    cli.add_argument("--send", type=int, default=0)
    cli.add_argument("--expect", type=int, default=0)
    cli.add_argument("--go", metavar="FILE", help="wait for FILE before connecting")
    cli.add_argument("--hold", metavar="FILE", help="wait for FILE before closing")
    cli.add_argument("--half-close", metavar="FILE", help="shutdown(WR), wait for FILE, read")
    cli.add_argument("--in-thread", action="store_true", help="connect from a second thread")
    cli.add_argument("--repeat", type=int, default=1, help="this many connections in a row")
    cli.add_argument("--tag", default="", help="ignored (makes the command line longer)")
    cli.add_argument(
        "--protocol",
        choices=("raw", "tls", "http2", "dns"),
        default="raw",
        help="send a TLS ClientHello (SNI flowtap.example), an HTTP/2 preface or a DNS "
        "query instead of --send bytes of pattern()",
    )
    hld = roles.add_parser("holder")
    hld.add_argument("--host", default="127.0.0.1")
    hld.add_argument("--port", type=int, required=True)
    hld.add_argument("--connections", type=int, required=True)
    hld.add_argument("--hold", required=True)
    hld.add_argument("--pause", type=float, default=0.0)
    par = roles.add_parser("parent")
    par.add_argument("go")
    par.add_argument("url")
    par.add_argument("child_argv", nargs=argparse.REMAINDER)
    frk = roles.add_parser("forker")
    frk.add_argument("--port", type=int, required=True)
    frk.add_argument("--go", required=True)
    frk.add_argument("--interval", type=float, default=0.002)
    frk.add_argument("--max", type=int, default=1000)
    args = parser.parse_args()
    roles_run = {
        "server": server,
        "client": client,
        "holder": holder,
        "parent": parent,
        "forker": forker,
    }
    roles_run[args.role](args)


if __name__ == "__main__":
    main()
