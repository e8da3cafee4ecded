"""TLS library plug-ins: one module per library (base.py says what each declares).

LIBRARIES is the order files are tried in: Go before node before plain OpenSSL (a Go
executable may carry OpenSSL strings; node's OpenSSL is OpenSSL too, with a version to
show); flowtap's Java shim (javatls.py) last: only a file no other plug-in took is
searched for its signature.
Adding a library: a module here, its entry below, and its enum ft_source value in
bpf/flowtap.h (docs/tls.md, "Adding a TLS library").
"""

from __future__ import annotations

from typing import Any

from flowtap.tls.plugins.base import (
    AttachContext,
    NotProbedError,
    ProbePlan,
    TlsLibrary,
    TlsPlan,
)
from flowtap.tls.plugins.gotls import GOTLS
from flowtap.tls.plugins.javatls import JAVATLS
from flowtap.tls.plugins.nodetls import NODETLS
from flowtap.tls.plugins.openssl import OPENSSL

__all__ = [
    "LIBRARIES",
    "NAMES",
    "AttachContext",
    "Library",
    "NotProbedError",
    "ProbePlan",
    "TlsLibrary",
    "TlsPlan",
    "select",
    "shared_libraries",
    "signatures",
    "sources",
]

Library = TlsLibrary[Any]
LIBRARIES: tuple[Library, ...] = (GOTLS, NODETLS, OPENSSL, JAVATLS)
NAMES: tuple[str, ...] = tuple(library.name for library in LIBRARIES)


def select(names: tuple[str, ...]) -> tuple[Library, ...]:
    """The plug-ins named (--tls-probes), in the registry's order. KeyError names an
    unknown one (the settings check names first)."""
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise KeyError(", ".join(unknown))
    return tuple(library for library in LIBRARIES if library.name in names)


def signatures(libraries: tuple[Library, ...]) -> tuple[bytes, ...]:
    """Byte strings of which any makes a file worth parsing for these plug-ins."""
    return tuple(dict.fromkeys(s for library in libraries for s in library.signatures))


def shared_libraries(libraries: tuple[Library, ...]) -> tuple[str, ...]:
    """Library name prefixes to look up before any process maps them (libssl.so)."""
    return tuple(dict.fromkeys(n for library in libraries for n in library.shared_libraries))


def sources() -> dict[str, str]:
    """enum ft_source name -> the capture source its records carry, for every plug-in
    (switched off or not: the kernel's records decode the same)."""
    return {library.source_enum: library.source for library in LIBRARIES}
