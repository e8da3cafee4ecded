"""Fixtures for the e2e suite: root check, a test cgroup, and the lab (peers + sensors)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import BPF_OBJECT, Cgroup, Lab, cgroup2_mount, lab, make_pki


@pytest.fixture(autouse=True)
def _needs_root_and_build() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e: flowtap loads eBPF programs and makes cgroups, which needs root")
    if not BPF_OBJECT.exists():
        pytest.skip(f"e2e: {BPF_OBJECT} is missing; build it with `make bpf`")


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    """A fresh cgroup v2 directory flowtap-test-<random>, removed at teardown."""
    made = Cgroup.create(cgroup2_mount())
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def e2e(tmp_path: Path, cgroup: Cgroup) -> Iterator[Lab]:
    """Starts peers and sensors for the test; stops all of them when it ends."""
    with lab(tmp_path, cgroup) as the_lab:
        yield the_lab


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA the tests make, and a certificate it signs for 127.0.0.1."""
    return make_pki(tmp_path_factory.mktemp("pki"))
