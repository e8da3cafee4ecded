"""TLS contexts of the egress proxy: the client-facing side (our leaves) and the upstream side.

Python's ``ssl`` loads certificate chains from files only; leaves are handed to it through
an anonymous in-memory file (memfd), so leaf keys never touch a disk.
"""

from __future__ import annotations

import os
import ssl
from collections import OrderedDict
from typing import Literal

from flowtap.proxy.ca import CertificateAuthority, Leaf

__all__ = ["ClientContexts", "UpstreamContexts", "is_rejection", "rejection_evidence"]

# Alerts a client sends when it does not accept our certificate: it distrusts our CA, or it
# pins another key. Other handshake failures (no shared cipher...) are not about trust.
_CERTIFICATE_ALERTS = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
    "DECRYPT_ERROR",
)
# A generic alert: some pinning clients send it, so does a client for many other reasons.
_WEAK_ALERTS = ("HANDSHAKE_FAILURE",)


def rejection_evidence(exc: BaseException) -> Literal["alert", "hangup"] | None:
    """What a failed client-side handshake says about the client refusing our certificate:
    ``alert``, it said so (a certificate alert); ``hangup``, it hung up in the middle of
    the handshake (what clients that verify after the handshake, or pin, commonly do, but
    also a client that gave up or died) or sent a generic alert; None: not about trust."""
    if isinstance(exc, ssl.SSLError):
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "hangup"
        text = f"{exc.reason or ''} {exc}".upper()
        if "ALERT" in text and any(reason in text for reason in _CERTIFICATE_ALERTS):
            return "alert"
        if "ALERT" in text and any(reason in text for reason in _WEAK_ALERTS):
            return "hangup"
        return None
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return "hangup"
    return None


def is_rejection(exc: BaseException) -> bool:
    """Whether a failed client-side handshake may mean the client refused our certificate."""
    return rejection_evidence(exc) is not None


def _load_leaf(context: ssl.SSLContext, leaf: Leaf) -> None:
    fd = os.memfd_create("flowtap-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, leaf.cert_pem + leaf.key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class ClientContexts:
    """Server-side contexts presenting a leaf for one name and offering one ALPN (the one the
    upstream chose), cached by (name, alpn)."""

    def __init__(self, ca: CertificateAuthority, *, cache_size: int = 1024) -> None:
        self.ca = ca
        self._cache: OrderedDict[tuple[str, str | None], ssl.SSLContext] = OrderedDict()
        self._cache_size = max(1, cache_size)

    def get(self, name: str, alpn: str | None) -> ssl.SSLContext:
        key = (name.lower(), alpn)
        context = self._cache.get(key)
        if context is not None:
            self._cache.move_to_end(key)
            return context
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_leaf(context, self.ca.leaf(name))
        if alpn is not None:
            context.set_alpn_protocols([alpn])
        self._cache[key] = context
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return context


class UpstreamContexts:
    """Client-side contexts toward the original destinations: verified against the system
    roots (plus ``extra_ca_file``), offering the client's ALPN list, cached by that list."""

    def __init__(self, *, extra_ca_file: str | None = None, verify: bool = True) -> None:
        self.extra_ca_file = extra_ca_file
        self.verify = verify
        self._cache: dict[tuple[str, ...], ssl.SSLContext] = {}

    def get(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        context = self._cache.get(alpn)
        if context is not None:
            return context
        context = ssl.create_default_context()
        if self.extra_ca_file is not None:
            context.load_verify_locations(cafile=self.extra_ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if alpn:
            context.set_alpn_protocols(list(alpn))
        if len(self._cache) < 64:  # ALPN lists are few; bound them against odd clients
            self._cache[alpn] = context
        return context
