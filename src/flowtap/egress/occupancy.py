"""Whether another flowtap egress redirection already covers a cgroup.

Two sensors' connect hooks on one cgroup (or on a cgroup and one inside it) both run for
a connect; the first to rewrite the destination wins, and its proxy gets the connection:
the other sensor would silently record nothing of what the first proxies. So the egress
controller asks the kernel before attaching: programs named like ours (``egress_connect4``)
that run for the cgroup's sockets (attached to it or to an ancestor) or that are attached
to a cgroup below it; and, through /proc, which processes hold their links.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flowtap.loader.kernel import BPF_CGROUP_INET4_CONNECT, cgroup_program_ids, program_name

__all__ = ["Occupant", "describe", "egress_occupants"]

MARKER = "egress_connect4"  # bpf/egress.bpf.c's connect4 program (names keep 15 characters)
_MAX_CGROUPS = 10_000  # descendants looked at, at most (a host has hundreds)
_MAX_FDS = 1 << 20  # descriptors looked at to find who holds a link, at most


@dataclass(frozen=True)
class Occupant:
    prog_id: int
    where: str  # "this cgroup or an ancestor", or the descendant's path
    holders: tuple[int, ...]  # pids holding a link to the program (empty: unknown)


def egress_occupants(cgroup: Path) -> list[Occupant]:
    """Egress redirections other than ours that cover ``cgroup`` or part of it.
    OSError when the kernel cannot be asked about the cgroup itself."""
    found: dict[int, str] = {}
    for prog_id in cgroup_program_ids(str(cgroup), BPF_CGROUP_INET4_CONNECT, effective=True):
        if program_name(prog_id) == MARKER:
            found.setdefault(prog_id, f"{cgroup} (attached there or to a parent)")
    seen = 0
    for directory, subdirs, _ in os.walk(cgroup):
        if directory == str(cgroup):
            continue
        seen += 1
        if seen > _MAX_CGROUPS:
            subdirs.clear()
            break
        try:
            ids = cgroup_program_ids(directory, BPF_CGROUP_INET4_CONNECT)
        except OSError:
            continue  # gone meanwhile
        for prog_id in ids:
            if program_name(prog_id) == MARKER:
                found.setdefault(prog_id, directory)
    holders = _link_holders(set(found))
    return [
        Occupant(prog_id, where, tuple(sorted(holders.get(prog_id, set()))))
        for prog_id, where in found.items()
    ]


def _link_holders(prog_ids: set[int]) -> dict[int, set[int]]:
    """pid(s) holding a BPF link to each program, from /proc/PID/fdinfo (bounded)."""
    out: dict[int, set[int]] = {}
    if not prog_ids:
        return out
    looked = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            looked += 1
            if looked > _MAX_FDS:
                return out
            try:
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") != "anon_inode:bpf_link":
                    continue
                with open(f"/proc/{entry.name}/fdinfo/{fd}") as stream:
                    info = stream.read()
            except OSError:
                continue
            for line in info.splitlines():
                name, _, value = line.partition(":")
                if name == "prog_id" and value.strip().isdigit():
                    if int(value) in prog_ids:
                        out.setdefault(int(value), set()).add(int(entry.name))
                    break
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as stream:
            return stream.read().strip()
    except OSError:
        return "?"


def describe(occupants: list[Occupant], cgroup: Path) -> str:
    """The refusal: what is attached, by whom, and what to do."""
    parts = []
    for occupant in occupants:
        who = (
            ", ".join(f"pid {pid} ({_comm(pid)})" for pid in occupant.holders)
            if occupant.holders
            else "a process flowtap cannot name (the program is not held by a link)"
        )
        parts.append(f"program {occupant.prog_id} on {occupant.where}, held by {who}")
    return (
        f"another flowtap egress redirection already covers --egress-cgroup {cgroup}: "
        + "; ".join(parts)
        + ". Its proxy would get those connections and this sensor would record none of "
        "them. Stop the other sensor first, or give each its own --egress-cgroup, neither "
        "inside the other"
    )
