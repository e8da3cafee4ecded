"""Which TLS connections the proxy passes through uninspected, and why.

A client that refuses our certificate (it pins, or distrusts our CA) would fail every time
it is intercepted, so its connections to that destination pass through from then on. That
decision is a hole in what is recorded, so it is made narrowly:

* per client: the client process (pid) when the proxy knows it, else the client's address;
  one client's behaviour never changes what another gets;
* on evidence: a certificate alert from the client (unknown_ca, bad_certificate...) at
  once; a hang-up in the middle of our handshake (what clients that verify after the
  handshake do, but also a client that timed out or was killed) only after ``hangups`` of
  them from that client to that destination within ``ttl``;
* for a while: an entry expires ``ttl`` seconds after it was made, and the client is
  intercepted again (and may earn it again);
* bounded: at most ``capacity`` entries (and as many hang-up tallies), oldest evicted.

Everything is counted: ``passthrough_learned_alert``, ``passthrough_learned_hangups``,
``passthrough_hangups``, ``passthrough_expired``, ``passthrough_evicted`` and the current
number of entries, ``passthrough_destinations``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

__all__ = ["ClientKey", "Evidence", "PassthroughKey", "PassthroughTable", "client_key"]

ClientKey = tuple[Literal["pid", "address"], int | str]
PassthroughKey = tuple[ClientKey, str, int, str | None]  # client, host, port, SNI
Evidence = Literal["alert", "hangup"]


def client_key(pid: int | None, address: str) -> ClientKey:
    """Who a passthrough decision is for: the process when known, else its address."""
    return ("pid", pid) if pid is not None else ("address", address)


class PassthroughTable:
    def __init__(
        self,
        *,
        ttl: float,
        hangups: int,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.hangups = max(1, hangups)
        self.capacity = max(1, capacity)
        self._clock = clock
        self._entries: OrderedDict[PassthroughKey, float] = OrderedDict()  # -> expiry
        self._tallies: OrderedDict[PassthroughKey, tuple[int, float]] = OrderedDict()
        self.learned_alert = 0
        self.learned_hangups = 0
        self.hangups_seen = 0
        self.expired = 0
        self.evicted = 0

    def passes(self, key: PassthroughKey) -> bool:
        """Whether this client's connection to this destination passes through now."""
        expiry = self._entries.get(key)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._entries[key]
            self.expired += 1
            return False
        return True

    def rejected(self, key: PassthroughKey, evidence: Evidence) -> bool:
        """The client failed our handshake with this evidence; True when its connections
        to the destination pass through from now on."""
        now = self._clock()
        if evidence == "hangup":
            self.hangups_seen += 1
            count, window_end = self._tallies.pop(key, (0, now + self.ttl))
            if now >= window_end:
                count, window_end = 0, now + self.ttl
            count += 1
            if count < self.hangups:
                self._tallies[key] = (count, window_end)
                while len(self._tallies) > self.capacity:
                    self._tallies.popitem(last=False)
                return False
            self.learned_hangups += 1
        else:
            self._tallies.pop(key, None)
            self.learned_alert += 1
        self._entries.pop(key, None)
        self._entries[key] = now + self.ttl
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evicted += 1
        return True

    def entries(self) -> list[PassthroughKey]:
        """The live entries, oldest first (expired ones are dropped and counted)."""
        now = self._clock()
        for key in [k for k, expiry in self._entries.items() if now >= expiry]:
            del self._entries[key]
            self.expired += 1
        return list(self._entries)

    def counters(self) -> dict[str, int]:
        return {
            "passthrough_destinations": len(self.entries()),
            "passthrough_learned_alert": self.learned_alert,
            "passthrough_learned_hangups": self.learned_hangups,
            "passthrough_hangups": self.hangups_seen,
            "passthrough_expired": self.expired,
            "passthrough_evicted": self.evicted,
        }
