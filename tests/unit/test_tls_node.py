"""node's version, read from the executable's bytes (never by running it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowtap.tls.node import node_version


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x7fELF...\0node.js/v20.20.2\0(delegate_) != nullptr\0", "v20.20.2"),
        (b"https://nodejs.org/download/release/v18.19.1/node-v18.19.1.tar.gz\0", "v18.19.1"),
        (b"libssl: SSL_read\0OpenSSL 3.0.11\0", None),
        (b"node.js/v20\0", None),  # not a whole version
        (b"", None),
    ],
)
def test_node_version(tmp_path: Path, content: bytes, expected: str | None) -> None:
    path = tmp_path / "exe"
    path.write_bytes(content)
    assert node_version(path) == expected
