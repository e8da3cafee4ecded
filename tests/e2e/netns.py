"""A test host: a network namespace the test makes, joined to this one by a veth pair.

Its addresses are in a random /30 of 10.231.0.0/16 and a random /64 of fd31::/16, so that
traffic leaving this namespace for it reaches only a host the test made (DESIGN.md: no
other address). Removed at the end.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class TestHost:
    __test__ = False  # not a test class, for pytest
    namespace: str
    address: str  # inside the namespace
    gateway: str  # this side of the veth pair
    address6: str  # the same, IPv6 (a unique local /64)
    gateway6: str

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside the test host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def make_test_host() -> Iterator[TestHost]:
    tag = secrets.token_hex(3)
    namespace, outside, inside = f"flowtap-test-{tag}", f"ftv{tag}a", f"ftv{tag}b"
    subnet = secrets.randbelow(250) + 2
    prefix = f"fd31:{secrets.randbelow(0xFFFF) + 1:x}:{subnet:x}"  # canonical: no leading 0
    host = TestHost(
        namespace, f"10.231.{subnet}.2", f"10.231.{subnet}.1", f"{prefix}::2", f"{prefix}::1"
    )
    _ip("netns", "add", namespace)
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("addr", "add", f"{host.gateway}/30", "dev", outside)
        # nodad: usable at once, not "tentative" for the next second or two.
        _ip("addr", "add", f"{host.gateway6}/64", "dev", outside, "nodad")
        _ip("link", "set", outside, "up")
        _ip("-n", namespace, "addr", "add", f"{host.address}/30", "dev", inside)
        _ip("-n", namespace, "addr", "add", f"{host.address6}/64", "dev", inside, "nodad")
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield host
    finally:
        subprocess.run(["ip", "link", "del", outside], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
