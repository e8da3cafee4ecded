"""The kernel half of the egress controller: bpf/egress.bpf.c on one cgroup v2.

Loads the object with the proxy's port and pid in its settings, shares the socket
layer's QPOINT_STRATEGY table, attaches connect4/connect6/sockops/getsockopt to the
cgroup through links (gone when the links are, or the sensor dies), and answers who
made a redirected connection.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from flowtap.loader.btf import Btf
from flowtap.loader.errors import BpfError
from flowtap.loader.libbpf import BpfLink, BpfMap, BpfObject
from flowtap.loader.system import bpf_object_path

log = logging.getLogger("flowtap.egress")

_PROGRAMS = ("egress_connect4", "egress_connect6", "egress_sockops", "egress_getsockopt")


@dataclass(frozen=True)
class Origin:
    """Where a redirected connection was going, and the process that made it."""

    address: str
    port: int
    pid: int


def _address_bytes(address: str) -> tuple[bytes, int]:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # the kernel keys dual-stack IPv4 connections as IPv4
    if ip.version == 4:
        return ip.packed + bytes(12), socket.AF_INET
    return ip.packed, socket.AF_INET6


class EgressRedirect:
    """Attached while the egress controller runs; `close()` removes every link."""

    def __init__(self, cgroup: Path, proxy_port: int, strategies: BpfMap) -> None:
        self.cgroup = cgroup
        self._links: list[BpfLink] = []
        self._obj = BpfObject.open(bpf_object_path("egress.bpf.o"))
        try:
            btf = Btf(self._obj)
            layout = btf.struct_layout("ft_egress_config")
            image = layout.pack({"proxy_tgid": os.getpid(), "proxy_port": socket.htons(proxy_port)})
            offset, _ = btf.variable_offset(".rodata", "ecfg")
            self._obj.map(".rodata").write_initial_value(offset, image)
            self._obj.map("strategies").reuse(strategies)
            self._obj.load()
            self._key = btf.struct_layout("ft_egress_key")
            self._origin = btf.struct_layout("ft_egress_origin")
            self._counter_names = {
                value: name.removeprefix("FT_EGRESS_").lower()
                for name, value in btf.enum_values("ft_egress_counter").items()
                if name != "FT_EGRESS_MAX"
            }
            self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        try:
            fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise BpfError(
                f"cannot open --egress-cgroup {self.cgroup}: {exc.strerror}",
                fix="name a directory of the cgroup v2 hierarchy",
            ) from exc
        try:
            for name in _PROGRAMS:
                self._links.append(self._obj.program(name).attach_cgroup(fd))
        finally:
            os.close(fd)
        log.info("egress redirection attached to cgroup %s", self.cgroup)

    def origin(self, peer: tuple[str, int]) -> Origin | None:
        """The redirected connection whose client is `peer` (as the proxy's accepted
        socket sees it), or None if it was not redirected."""
        addr, family = _address_bytes(peer[0])
        key = self._key.pack({"addr": addr, "port": socket.htons(peer[1]), "family": family})
        raw = self._obj.map("redirects").lookup(key)
        if raw is None:
            return None
        fields = self._origin.unpack(raw)
        packed = fields.raw("addr")
        family_out = fields.integer("family")
        address = (
            str(ipaddress.IPv4Address(packed[:4]))
            if family_out == socket.AF_INET
            else str(ipaddress.IPv6Address(packed))
        )
        return Origin(address, socket.ntohs(fields.integer("port")), fields.integer("pid"))

    def counters(self) -> dict[str, int]:
        table = self._obj.map("egress_counters")
        totals: dict[str, int] = {}
        for index, name in self._counter_names.items():
            raw = table.lookup(struct.pack("<I", index)) or b""
            totals[name] = sum(v for (v,) in struct.iter_unpack("<Q", raw))
        return totals

    def close(self) -> None:
        for link in self._links:
            link.destroy()
        self._links.clear()
        self._obj.close()
