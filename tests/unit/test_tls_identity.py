"""Keying files as uprobes know them: an overlay's file by the layer file below it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowtap.tls.identity import Overlay, parse_overlays, path_key, real_key, stat_key
from flowtap.tls.libraries import executable_mappings

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
48 27 0:40 / /tmp/ovl/top rw,relatime - overlay overlay rw,lowerdir=/tmp/ovl/lower,\
upperdir=/tmp/ovl/upper,workdir=/tmp/ovl/work,uuid=on
49 27 0:41 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,\
lowerdir=/l/a\\:b:/l/c\\134:d:/l/with\\,x::/l/data,upperdir=/u/my\\040dir,workdir=/w
50 27 0:42 /sub /mnt/part rw - overlay overlay rw,lowerdir+=/l/1,lowerdir+=/l/2
51 27 0:43 / /mnt/empty rw - overlay overlay rw,workdir=/w
garbage
"""


def test_parse_overlays() -> None:
    assert parse_overlays(MOUNTINFO) == [
        Overlay((0, 40), "/", "/tmp/ovl/top", ("/tmp/ovl/upper", "/tmp/ovl/lower")),
        Overlay(
            (0, 41),
            "/",
            "/var/lib/docker/overlay2/abc/merged",
            # Upper first; escaped ':' and ',' stay in a path; "::" (data-only) is no layer.
            ("/u/my dir", "/l/a:b", "/l/c:d", "/l/with,x", "/l/data"),
        ),
        Overlay((0, 42), "/sub", "/mnt/part", ("/l/1", "/l/2")),
    ]


def test_names_inside_the_overlay() -> None:
    overlay = Overlay((0, 40), "/", "/tmp/ovl/top", ("/u",))
    assert overlay.names("/tmp/ovl/top/usr/libssl.so.3") == [
        "usr/libssl.so.3",  # below the mount point
        "tmp/ovl/top/usr/libssl.so.3",  # then every ending of the path
        "ovl/top/usr/libssl.so.3",
        "top/usr/libssl.so.3",
        "libssl.so.3",
    ]
    root = Overlay((0, 40), "/sub", "/", ("/u",))  # a container's root, a subtree of it
    assert root.names("/usr/libssl.so.3") == ["sub/usr/libssl.so.3", "sub/libssl.so.3"]


def layers(tmp_path: Path) -> tuple[Path, Path, Overlay]:
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    for layer in (upper, lower):
        (layer / "lib").mkdir(parents=True)
    overlay = Overlay((0, 99), "/", "/merged", (str(upper), str(lower)))
    return upper, lower, overlay


def key_of(path: Path) -> tuple[int, int, int]:
    return stat_key(os.stat(path))


def test_overlay_file_is_the_layers(tmp_path: Path) -> None:
    _upper, lower, overlay = layers(tmp_path)
    (lower / "lib" / "libssl.so.3").write_bytes(b"lower")
    real = key_of(lower / "lib" / "libssl.so.3")
    shown = (0, 99, real[2])  # overlayfs: its own device, the layer file's inode number

    assert real_key(shown, "/merged/lib/libssl.so.3", [overlay]) == real
    # xino: the layer's index in the high bits of the inode number.
    assert real_key((0, 99, real[2] | 1 << 60), "/merged/lib/libssl.so.3", [overlay]) == real
    # The same key from the layer itself, or from any other file system: as it is.
    assert real_key(real, str(lower / "lib" / "libssl.so.3"), [overlay]) == real
    assert real_key((8, 1, 5), "/merged/lib/libssl.so.3", [overlay]) == (8, 1, 5)


def test_upper_layer_first(tmp_path: Path) -> None:
    upper, lower, overlay = layers(tmp_path)
    (lower / "lib" / "libssl.so.3").write_bytes(b"lower")
    (upper / "lib" / "libssl.so.3").write_bytes(b"copied up")
    real = key_of(upper / "lib" / "libssl.so.3")
    assert real_key((0, 99, real[2]), "/merged/lib/libssl.so.3", [overlay]) == real


def test_unsure_keeps_the_key(tmp_path: Path) -> None:
    """Not the same inode number, no such file, not below the mount: nothing is guessed."""
    _upper, lower, overlay = layers(tmp_path)
    (lower / "lib" / "libssl.so.3").write_bytes(b"lower")
    real = key_of(lower / "lib" / "libssl.so.3")
    other = (0, 99, real[2] + 1)
    assert real_key(other, "/merged/lib/libssl.so.3", [overlay]) == other
    shown = (0, 99, real[2])
    assert real_key(shown, "/merged/lib/libcrypto.so.3", [overlay]) == shown
    assert real_key(shown, "/merged/libssl.so.3", [overlay]) == shown


def test_other_roots(tmp_path: Path) -> None:
    """A process chrooted into the overlay sees it at "/", and its maps show paths from
    its namespace's root, which a chrooted sensor does not see either: the layers still
    hold the path's ending."""
    _upper, lower, overlay = layers(tmp_path)
    (lower / "lib" / "libssl.so.3").write_bytes(b"lower")
    real = key_of(lower / "lib" / "libssl.so.3")
    theirs = Overlay((0, 99), "/", "/", overlay.layers)
    shown = (0, 99, real[2])
    assert real_key(shown, "/newroot/merged/lib/libssl.so.3", [theirs], [overlay]) == real


def test_executable_mappings_by_layer_file(tmp_path: Path) -> None:
    """Two processes' views of one file (through an overlay, and directly) are one key."""
    _upper, lower, _overlay = layers(tmp_path)
    library = lower / "lib" / "libssl.so.3"
    library.write_bytes(b"lower")
    major, minor, inode = key_of(library)
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        f"48 27 0:99 / /merged rw - overlay overlay rw,lowerdir={lower},"
        f"upperdir={tmp_path / 'upper'},workdir=/w\n"
    )
    (proc / "7").mkdir()
    (proc / "7" / "maps").write_text(
        f"7f00-7f10 r-xp 00001000 00:63 {inode} /merged/lib/libssl.so.3\n"
        f"7f20-7f30 r-xp 00001000 {major:02x}:{minor:02x} {inode} {library}\n"
    )

    found = executable_mappings(7, proc)

    assert [(m.key, m.path) for m in found] == [((major, minor, inode), "/merged/lib/libssl.so.3")]


def test_path_key_as_maps_shows_it(tmp_path: Path) -> None:
    """Mapped here, a file on a plain file system shows what stat() says; an empty file
    cannot be mapped and is keyed by stat(); a missing one raises."""
    library, empty = tmp_path / "libx.so", tmp_path / "empty"
    library.write_bytes(b"\x7fELF" + bytes(5000))
    empty.write_bytes(b"")
    assert path_key(library) == key_of(library)
    assert path_key(empty) == key_of(empty)
    with pytest.raises(FileNotFoundError):
        path_key(tmp_path / "missing")
