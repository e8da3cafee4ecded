"""/proc/net/tcp parsing for explicit-proxy client attribution, with bytes alone."""

from __future__ import annotations

import socket
import subprocess
import sys

from flowtap.egress.sockets import socket_inodes, socket_owner

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 222 1
   2: 0100007F:D431 0100007F:1F91 06 00000000:00000000 00:00000000 00000000     0        0 333 1
   3: garbage
   4: ZZZZ:1 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 444 1
"""

TCP6 = """  sl  local_address                         remote_address                        st
   0: 0000000000000000FFFF00000100007F:D432 0000000000000000FFFF00000100007F:1F90 01 0 0 0 0 0 555 1
   1: 00000000000000000000000001000000:D433 00000000000000000000000001000000:1F90 01 0 0 0 0 0 666 1
"""


def test_established_sockets_by_local_end() -> None:
    assert socket_inodes(TCP, ("127.0.0.1", 0xD431)) == [222]  # listening and TIME_WAIT skipped
    assert socket_inodes(TCP, ("127.0.0.1", 1)) == []
    assert socket_inodes(TCP6, ("127.0.0.1", 0xD432)) == [555]  # dual-stack IPv4
    assert socket_inodes(TCP6, ("::1", 0xD433)) == [666]
    assert socket_inodes("", ("127.0.0.1", 1)) == []


CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""


def test_owner_of_a_live_socket() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        child = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(server.getsockname()[1])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            conn, _ = server.accept()
            with conn:
                assert socket_owner(("127.0.0.1", port)) == child.pid
                # Only this process holds the accepted end, and it never counts itself.
                assert socket_owner(conn.getsockname()[:2]) is None
        finally:
            child.kill()
            child.wait()
