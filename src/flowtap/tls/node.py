"""Node.js executables: OpenSSL linked into `node`, on memory BIOs (docs/tls.md).

The probes are OpenSSL's (placement.py); node's TLS needs no offsets of its own, since
its plaintext is tied to the socket the same thread just received on. Its version is only
reported, read from the file (never by running it): node keeps its own name and version
in read-only data, as the inspector's "node.js/vX.Y.Z" and as the release's source URL.
"""

from __future__ import annotations

import re
from pathlib import Path

from flowtap.tls.elf import mapped

_VERSION = re.compile(
    rb"node\.js/v(\d{1,3}\.\d{1,3}\.\d{1,3})\0"
    rb"|nodejs\.org/download/release/v(\d{1,3}\.\d{1,3}\.\d{1,3})/"
)


def node_version(path: Path) -> str | None:
    """The version ("v20.20.2") when the file is a node executable that says so."""
    with mapped(path) as view:
        found = None if view is None else _VERSION.search(view)
        # Read the match while the mapping is open: groups are slices of it.
        version: bytes | None = None if found is None else found.group(1) or found.group(2)
    return None if version is None else "v" + version.decode()
