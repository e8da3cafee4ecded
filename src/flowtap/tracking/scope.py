"""--direction egress-internal / egress-external: which outbound peers count as internal.

The kernel applies the same ranges to the connections it tracks (bpf/sensor/scope.h); this
applies them where userspace alone sees the peer (the egress proxy's records).
"""

from __future__ import annotations

import ipaddress

# Private (RFC 1918), loopback, link-local, carrier-grade NAT; IPv6 unique local,
# link-local and loopback; IPv4-mapped IPv6 addresses count as their IPv4 address.
INTERNAL_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)

# The kernel's enum ft_egress_scope, by --direction.
EGRESS_SCOPES = {"all": 0, "egress": 0, "ingress": 0, "egress-internal": 1, "egress-external": 2}


def is_internal(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in INTERNAL_NETWORKS)


def egress_in_scope(direction: str, ip: str) -> bool:
    """Whether an outbound connection to ip is in --direction's scope."""
    if direction == "egress-internal":
        return is_internal(ip)
    if direction == "egress-external":
        return not is_internal(ip)
    return True
