"""Go executables: build info, versions, and the probe sites, from bytes alone."""

from __future__ import annotations

import pytest

from flowtap.tls.elf import ElfReadError
from flowtap.tls.golang import (
    GoPlacement,
    UnsupportedGoError,
    build_version,
    parse_version,
    pointed_version,
)

MAGIC = b"\xff Go buildinf:"


def buildinfo(version: bytes, *, flags: int = 0x2) -> bytes:
    """A .go.buildinfo section as Go 1.18+ writes it: header, then length-prefixed text."""
    header = MAGIC + bytes([8, flags]) + bytes(16)
    return header + bytes([len(version)]) + version + bytes([0])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("go1.19.8", (1, 19)),
        ("go1.22rc1", (1, 22)),
        ("devel go1.23-abc123 Tue", (1, 23)),
        ("go1.9", (1, 9)),
        ("gccgo", None),
        ("", None),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_version(text) == expected


def test_build_version_inline() -> None:
    assert build_version(buildinfo(b"go1.21.5")) == "go1.21.5"


def test_build_info_before_go_1_18_is_reported() -> None:
    with pytest.raises(UnsupportedGoError, match=r"before Go 1\.18"):
        build_version(buildinfo(b"go1.16.2", flags=0))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not go at all" * 4,
        MAGIC + bytes([8, 2]),  # header cut short
        buildinfo(b"go1.21.5")[:34],  # version cut short
        MAGIC + bytes([8, 2]) + bytes(16) + b"\xff" * 12,  # a varint that never ends
    ],
)
def test_bad_build_info_is_refused(blob: bytes) -> None:
    with pytest.raises((ElfReadError, UnsupportedGoError)):
        build_version(blob)


def test_sites_entry_then_every_ret() -> None:
    placement = GoPlacement(
        "go1.19.8",
        (
            ("crypto/tls.(*Conn).Read", 0x1000, (0x1010, 0x1020)),
            ("crypto/tls.(*Conn).Write", 0x2000, (0x2030,)),
            ("crypto/tls.(*Conn).serverHandshake", 0x3000, (0x3040,)),
        ),
        "pclntab",
    )
    assert [(s.program, s.offset, s.retprobe) for s in placement.sites()] == [
        ("go_read_enter", 0x1000, False),
        ("go_return", 0x1010, False),
        ("go_return", 0x1020, False),
        ("go_write_enter", 0x2000, False),
        ("go_return", 0x2030, False),
        ("go_handshake_enter", 0x3000, False),
        ("go_handshake_return", 0x3040, False),
    ]
    assert "no tls.Conn walk" in placement.describe()


def test_go_1_17_build_info_points_at_the_version() -> None:
    """Before Go 1.18 the build info holds the address of runtime.buildVersion (a string
    header: pointer, length)."""
    memory = {0x5000: (0x6000).to_bytes(8, "little") + (8).to_bytes(8, "little")}
    memory[0x6000] = b"go1.17.9"
    blob = MAGIC + bytes([8, 0]) + (0x5000).to_bytes(8, "little") + bytes(8)

    def read(address: int, length: int) -> bytes:
        return memory[address][:length]

    assert pointed_version(blob, read) == "go1.17.9"
    with pytest.raises(UnsupportedGoError, match="big-endian"):
        pointed_version(MAGIC + bytes([8, 1]) + bytes(16), read)
