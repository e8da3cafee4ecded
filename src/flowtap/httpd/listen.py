"""--httpd-listen: `HOST:PORT`, `[V6]:PORT` or `off`."""

from __future__ import annotations

import ipaddress

OFF = "off"


def parse_listen(text: str) -> tuple[str, int] | None:
    """(host, port), or None for `off`. The host must be an IP address: a name would be
    resolved at start, and could resolve to every interface."""
    text = text.strip()
    if text.lower() == OFF:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:10001) or off")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (use 127.0.0.1, ::1, or the address of one "
            "interface; 0.0.0.0 exposes the endpoints on every interface)"
        ) from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{port_text!r} is not a port number (1-65535)")
    return str(address), int(port_text)
