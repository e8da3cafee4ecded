"""Which process owns a local TCP socket, from /proc: for explicit-proxy clients, whose
connections were not redirected and so carry no pid from the kernel."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from pathlib import Path

_ESTABLISHED = "01"


def _decode_address(text: str) -> tuple[str, int]:
    """/proc/net/tcp{,6} "ADDR:PORT": the address as 32-bit words in host order (little
    endian here), the port in hex."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def socket_inodes(table: str, local: tuple[str, int]) -> list[int]:
    """Inodes of established sockets whose local end is `local`, from one table's text."""
    inodes: list[int] = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _ESTABLISHED:
            continue
        try:
            if _decode_address(fields[1]) == local:
                inodes.append(int(fields[9]))
        except ValueError:
            continue  # a line this parser does not understand is skipped, not fatal
    return inodes


def socket_owner(local: tuple[str, int], proc: Path = Path("/proc")) -> int | None:
    """The pid of a process holding the TCP socket whose local end is `local`."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    tables = ("tcp6",) if family == socket.AF_INET6 else ("tcp", "tcp6")
    wanted: set[str] = set()
    for name in tables:
        with contextlib.suppress(OSError):
            text = (proc / "net" / name).read_text()
            wanted |= {f"socket:[{inode}]" for inode in socket_inodes(text, local)}
    if not wanted:
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(entry.name)
    return None
