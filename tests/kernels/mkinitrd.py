#!/usr/bin/python3
"""Build the guest initramfs: static busybox, /init, and the modules the guest needs
(virtio-pci, 9p over virtio, overlayfs; veth for the tests' network namespaces) with their
dependencies, in load order. The guest has no modprobe: a test that needs another module
adds it to WANTED (a module the kernel has built in is skipped).

usage: mkinitrd.py MODULES_DIR INIT_SCRIPT OUTPUT
MODULES_DIR is the kernel's lib/modules/<version> from the extracted .deb.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

WANTED = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "veth")
BUSYBOX = "/bin/busybox"


def norm(name: str) -> str:
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def resolve(moddir: Path) -> list[tuple[str, bytes]]:
    index: dict[str, Path] = {}
    for path in moddir.rglob("*.ko*"):
        index[norm(path.name.split(".ko")[0])] = path
    builtin_file = moddir / "modules.builtin"
    builtin: set[str] = set()
    if builtin_file.exists():
        builtin = {
            norm(Path(line).name.split(".ko")[0]) for line in builtin_file.read_text().split()
        }
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = norm(name)
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise SystemExit(f"module {name} neither built in nor in {moddir}")
        data = read_module(index[name])
        match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
        for dep in match.group(1).decode().split(",") if match else []:
            if dep:
                visit(dep)
        order.append((name, data))

    for wanted in WANTED:
        visit(wanted)
    return order


class Cpio:
    """A newc archive written in memory."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        )
        self.ino += 1
        self.buf.write(header.encode() + name.encode() + b"\0")
        self.buf.write(b"\0" * (-(110 + len(name) + 1) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def close(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def main() -> None:
    moddir, init_script, output = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    modules = resolve(moddir)
    archive = Cpio()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "ro", "rw", "newroot"):
        archive.dir(d)
    archive.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    archive.file("init", init_script.read_bytes(), 0o755)
    names = []
    for i, (name, data) in enumerate(modules):
        archive.file(f"lib/modules/{i:02d}-{name}.ko", data)
        names.append(name)
    archive.file(
        "lib/modules/order",
        ("\n".join(f"{i:02d}-{n}" for i, n in enumerate(names)) + "\n").encode(),
    )
    tmp = output.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(archive.close(), compresslevel=1))
    os.replace(tmp, output)
    print(f"{output}: modules {' '.join(names) or '(all built in)'}")


if __name__ == "__main__":
    main()
