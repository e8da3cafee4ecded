"""SO_ORIGINAL_DST: where a redirected connection was going.

Answered by netfilter for an nftables/iptables REDIRECT, and by flowtap's cgroup/getsockopt
program for its cgroup/connect redirection: the same call either way.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = ["SO_ORIGINAL_DST", "so_original_dst"]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
_SOL_IPV6 = 41


def so_original_dst(sock: socket.socket) -> tuple[str, int]:
    """(ip, port) the client connected to before redirection; OSError when unknown."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(_SOL_IPV6, SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
        family, port = _family_port(raw)
        addr = ipaddress.IPv6Address(raw[8:24])
        if family != socket.AF_INET6:
            raise OSError(f"SO_ORIGINAL_DST: unexpected address family {family}")
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped), port
        return str(addr), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    family, port = _family_port(raw)
    if family != socket.AF_INET:
        raise OSError(f"SO_ORIGINAL_DST: unexpected address family {family}")
    return socket.inet_ntoa(raw[4:8]), port


def _family_port(raw: bytes) -> tuple[int, int]:
    """sin_family is in host order, sin_port in network order."""
    (family,) = struct.unpack_from("=H", raw, 0)
    (port,) = struct.unpack_from("!H", raw, 2)
    return family, port
