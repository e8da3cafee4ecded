"""The fields a rule can read, looked up lazily from one transaction and its connection.

Names follow Qtap's rules (`http.req.method`, `src.process.binary`, `dst.port`, ...); the
short `req.*` / `res.*` forms of Qtap's older examples are accepted too.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass

from flowtap.protocols.messages import Request, Response, Transaction
from flowtap.records.connection import Record
from flowtap.rules.evaluate import MISSING


@dataclass(frozen=True, slots=True)
class Peer:
    """What the connection knows of the other end and its TLS session."""

    ip: str | None = None
    port: int | None = None
    domain: str | None = None  # SNI, else the Host the client asked for
    tls: bool = False
    tls_version: str | None = None
    sni: str | None = None


@dataclass(frozen=True, slots=True)
class Subject:
    transaction: Transaction
    process: Record
    direction: str
    protocol: str
    peer: Peer


Getter = Callable[[Subject], object]


def _header(message: Request | Response | None, name: str) -> object:
    if message is None:
        return None
    for key, value in message.headers:
        if key.lower() == name:
            return value
    return None


def _host(tx: Transaction) -> str | None:
    """The Host (or :authority) without its port, lower case."""
    request = tx.request
    if request is None or not request.authority:
        return None
    authority = request.authority.lower()
    if authority.startswith("["):  # [v6]:port
        return authority[1 : authority.find("]")] if "]" in authority else authority
    host, _, port = authority.rpartition(":")
    return host if host and port.isdigit() else authority


def _path(tx: Transaction) -> str | None:
    return tx.request.target.split("?", 1)[0] if tx.request else None


def _scheme(s: Subject) -> str | None:
    if s.transaction.request is None:
        return None
    return s.transaction.request.scheme or ("https" if s.peer.tls else "http")


def _url(s: Subject) -> str | None:
    request = s.transaction.request
    if request is None:
        return None
    host = request.authority or s.peer.domain or s.peer.ip or ""
    return f"{_scheme(s)}://{host}{request.target}"


def _ip(value: str | None) -> object:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


_GETTERS: dict[str, Getter] = {
    "http.req.method": lambda s: s.transaction.request.method if s.transaction.request else None,
    "http.req.path": lambda s: _path(s.transaction),
    "http.req.url": _url,
    "http.req.host": lambda s: _host(s.transaction),
    "http.req.scheme": _scheme,
    "http.req.version": lambda s: s.transaction.request.version if s.transaction.request else None,
    "http.res.status": lambda s: s.transaction.response.status if s.transaction.response else None,
    "src.process.path": lambda s: s.process.get("exe"),
    "src.process.binary": lambda s: os.path.basename(str(s.process.get("exe") or "")) or None,
    "src.process.pid": lambda s: s.process.get("pid"),
    "src.process.user.name": lambda s: s.process.get("user"),
    "src.process.user.id": lambda s: s.process.get("uid"),
    "src.container.id": lambda s: s.process.get("container_id"),
    "src.container.name": lambda s: s.process.get("container_name"),
    "src.container.image": lambda s: s.process.get("container_image"),
    "dst.ip": lambda s: _ip(s.peer.ip),
    "dst.port": lambda s: s.peer.port,
    "dst.domain": lambda s: s.peer.domain or _host(s.transaction),
    "tls.enabled": lambda s: s.peer.tls,
    "tls.version": lambda s: s.peer.tls_version,
    "tls.sni": lambda s: s.peer.sni,
    "direction": lambda s: s.direction,
    "protocol": lambda s: s.protocol,
}
_ALIASES = {"req.": "http.req.", "res.": "http.res."}
_HEADER_PREFIXES = {"http.req.headers.": "request", "http.res.headers.": "response"}


def canonical(name: str) -> str:
    lowered = name.lower()
    for short, full in _ALIASES.items():
        if lowered.startswith(short):
            return full + lowered[len(short) :]
    return lowered


def is_known(name: str) -> bool:
    """Whether a rule may name this field (for errors at load time, not at match time)."""
    name = canonical(name)
    if name in _GETTERS:
        return True
    return any(name.startswith(p) and len(name) > len(p) for p in _HEADER_PREFIXES)


def known_names() -> list[str]:
    return sorted([*_GETTERS, "http.req.headers.<name>", "http.res.headers.<name>"])


class TransactionFields:
    """One transaction's fields, each computed the first time a rule reads it."""

    __slots__ = ("_cache", "_subject")

    def __init__(self, subject: Subject) -> None:
        self._subject = subject
        self._cache: dict[str, object] = {}

    def lookup(self, name: str) -> object:
        try:
            return self._cache[name]
        except KeyError:
            pass
        value = self._compute(canonical(name))
        if value is None:
            value = MISSING
        self._cache[name] = value
        return value

    def get(self, name: str) -> object | None:
        value = self.lookup(name)
        return None if value is MISSING else value

    def _compute(self, name: str) -> object:
        getter = _GETTERS.get(name)
        if getter is not None:
            return getter(self._subject)
        tx = self._subject.transaction
        for prefix, side in _HEADER_PREFIXES.items():
            if name.startswith(prefix):
                message = tx.request if side == "request" else tx.response
                return _header(message, name[len(prefix) :])
        return None
