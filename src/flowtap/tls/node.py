"""Node.js executables: OpenSSL linked into `node`, on memory BIOs (docs/tls.md).

The probes are OpenSSL's (placement.py); node's TLS needs no offsets of its own, since
its plaintext is tied to the socket the same thread just received on. Its version is only
reported, read from the file (never by running it): node keeps its own name and version
in read-only data, as the inspector's "node.js/vX.Y.Z" and as the release's source URL.
"""

from __future__ import annotations

import re
from pathlib import Path

from flowtap.tls.elf import find_windowed, mapped

_VERSIONS = (
    (
        b"nodejs.org/download/release/v",
        re.compile(rb"nodejs\.org/download/release/v(\d{1,3}\.\d{1,3}\.\d{1,3})/"),
    ),
    (b"node.js/v", re.compile(rb"node\.js/v(\d{1,3}\.\d{1,3}\.\d{1,3})\0")),
)
_MAX_HITS = 64


def node_version(path: Path) -> str | None:
    """The version ("v20.20.2") when the file is a node executable that says so. Each
    form is found by a plain byte search first (a regular expression over node's 99 MB
    took 50 ms), then checked where it was found."""
    with mapped(path) as view:
        if view is None:
            return None
        for prefix, pattern in _VERSIONS:
            at = find_windowed(view, prefix)
            for _ in range(_MAX_HITS):
                if at == -1:
                    break
                found = pattern.match(view, at, at + 64)
                if found is not None:
                    return "v" + found.group(1).decode()
                at = find_windowed(view, prefix, at + 1)
    return None
