"""Qtap's process filters (`tap.filters`): executables whose traffic is ignored, by
predefined group or by a custom match, and `only` entries that trace nothing else."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from flowtap.tracking.processes import ProcessInfo

Strategy = Literal["exact", "prefix", "suffix", "contains", "regex"]
STRATEGIES: tuple[Strategy, ...] = ("exact", "prefix", "suffix", "contains", "regex")

# File names of the programs each of Qtap's groups stands for.
GROUPS: dict[str, tuple[str, ...]] = {
    "kubernetes": (
        "kubelet",
        "kube-proxy",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "etcd",
        "coredns",
    ),
    "container": (
        "containerd",
        "containerd-shim",
        "containerd-shim-runc-v2",
        "dockerd",
        "docker-proxy",
        "runc",
        "crun",
        "crio",
        "conmon",
        "podman",
    ),
    "gke": ("gke-metadata-server", "gcfsd", "netd", "fluent-bit", "konnectivity-agent"),
    "eks": ("aws-node", "aws-k8s-agent", "amazon-ssm-agent", "eks-pod-identity-agent"),
    "qpoint": ("qtap", "qpoint", "flowtap"),
}


@dataclass(frozen=True)
class ExeFilter:
    exe: str
    strategy: Strategy = "exact"
    only: bool = False  # an allow-list entry: processes matching no `only` entry are ignored
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, path: str) -> bool:
        if self.strategy == "exact":
            return path == self.exe
        if self.strategy == "prefix":
            return path.startswith(self.exe)
        if self.strategy == "suffix":
            return path.endswith(self.exe)
        if self.strategy == "contains":
            return self.exe in path
        pattern = self._regex or re.compile(self.exe)
        return pattern.search(path) is not None


def group_filters(name: str) -> tuple[ExeFilter, ...]:
    return tuple(ExeFilter("/" + program, "suffix") for program in GROUPS[name])


def filter_matcher(filters: Sequence[ExeFilter]) -> Callable[[ProcessInfo], bool]:
    """Whether a process is traced under these filters (a process with no known
    executable is traced unless there are `only` entries)."""
    ignore = [f for f in filters if not f.only]
    only = [f for f in filters if f.only]

    def traced(info: ProcessInfo) -> bool:
        exe = info.exe
        if not exe:
            return not only
        if only and not any(f.matches(exe) for f in only):
            return False
        return not any(f.matches(exe) for f in ignore)

    return traced
