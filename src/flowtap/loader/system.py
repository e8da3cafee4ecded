"""Host preconditions the loader needs: root, BTF, tracefs, the cgroup v2 mount."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from importlib import resources
from pathlib import Path

from flowtap.loader.errors import BpfError

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
TRACEFS = Path("/sys/kernel/tracing")


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


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup/unified on hybrid hosts)."""
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


def ensure_tracefs() -> str:
    """Mounts tracefs where the kernel expects it if nobody has; returns what was done."""
    if (TRACEFS / "events").is_dir():
        return f"tracefs at {TRACEFS}"
    if any(fstype == "tracefs" for fstype, _ in mounts()):
        legacy = Path("/sys/kernel/debug/tracing")
        if (legacy / "events").is_dir():
            return f"tracefs at {legacy}"
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"tracefs", str(TRACEFS).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpfError(
            f"tracefs is not mounted and mounting it failed: {os.strerror(err)}",
            fix=f"mount -t tracefs tracefs {TRACEFS}",
            errno_value=err,
        )
    return f"mounted tracefs at {TRACEFS}"
