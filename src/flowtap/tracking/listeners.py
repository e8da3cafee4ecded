"""Listening sockets that existed before the sensor, and who owns them.

The kernel learns a listener's owner when listen() runs; for listeners opened earlier,
this reads /proc/net/tcp{,6} (LISTEN sockets by inode) and /proc/PID/fd (which process
holds each inode), so connections they accept are attributed from the first packet.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_TCP_LISTEN = "0A"


@dataclass(frozen=True, slots=True)
class Listener:
    port: int
    pid: int


def listening_inodes(proc: Path = Path("/proc")) -> dict[int, int]:
    """inode -> local port of every TCP socket in LISTEN, IPv4 and IPv6."""
    found: dict[int, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            try:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                found[int(fields[9])] = port
            except (IndexError, ValueError):
                continue  # not a row the kernel writes; skip rather than fail start-up
    return found


def socket_owners(inodes: set[int], proc: Path = Path("/proc")) -> Iterator[tuple[int, int]]:
    """(inode, pid) for each of inodes that a process holds open."""
    try:
        entries = list(proc.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(entry / "fd" / fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1].isdigit():
                inode = int(target[8:-1])
                if inode in inodes:
                    yield inode, int(entry.name)


def existing_listeners(proc: Path = Path("/proc")) -> list[Listener]:
    """One owner per listening port (the lowest pid: the parent of pre-forked workers)."""
    inodes = listening_inodes(proc)
    owners: dict[int, int] = {}
    for inode, pid in socket_owners(set(inodes), proc):
        port = inodes[inode]
        owners[port] = min(pid, owners.get(port, pid))
    return [Listener(port, pid) for port, pid in sorted(owners.items())]
