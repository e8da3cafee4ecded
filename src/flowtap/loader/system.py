"""Host preconditions the loader needs: root, BTF, the cgroup v2 mount; package data."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

from flowtap.loader.errors import BpfError

BTF_PATH = Path("/sys/kernel/btf/vmlinux")


def bpf_object_path(name: str) -> Path:
    """A BPF object shipped as package data (built by `make bpf`)."""
    return Path(str(resources.files("flowtap") / "bpf" / name))


def mounts(path: Path = Path("/proc/self/mounts")) -> list[tuple[str, str]]:
    """(filesystem type, mount point) pairs."""
    pairs = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            pairs.append((fields[2], fields[1].replace("\\040", " ")))
    return pairs


@functools.cache
def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup/unified on hybrid hosts);
    read once (it does not move), not at every scope check of a connection."""
    for fstype, point in mounts():
        if fstype == "cgroup2":
            return Path(point)
    return None


def require_root() -> None:
    if os.geteuid() != 0:
        raise BpfError(
            "flowtap needs root to load eBPF programs",
            fix="run it as root: sudo flowtap run (or sudo .venv/bin/flowtap run)",
        )


def require_btf() -> None:
    if not BTF_PATH.exists():
        raise BpfError(
            f"this kernel has no BTF ({BTF_PATH} is missing)",
            fix="boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's kernels are)",
        )
