"""The trust store written as root into a directory others can write (issue 15, item 1):
the real CA export on the real filesystem, with links and files planted first."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flowtap.proxy.ca import PEM_NAME, CAError, CertificateAuthority

SECRET = b"root's secret\n"
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _setup(tmp_path: Path) -> tuple[CertificateAuthority, Path, Path]:
    ca = CertificateAuthority.load_or_create(tmp_path / "state")
    shared = tmp_path / "trust"
    shared.mkdir()
    shared.chmod(0o777)
    victim = tmp_path / "victim"
    victim.write_bytes(SECRET)
    victim.chmod(0o600)
    return ca, shared, victim


def test_planted_links_are_not_followed(tmp_path: Path) -> None:
    ca, shared, victim = _setup(tmp_path)
    # The temporary name the writer used (pid-based), and the final name.
    (shared / f".{PEM_NAME}.{os.getpid()}.tmp").symlink_to(victim)
    (shared / PEM_NAME).symlink_to(victim)
    ca.export_trust_store(shared)
    assert victim.read_bytes() == SECRET
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    pem = shared / PEM_NAME
    assert not pem.is_symlink() and pem.read_bytes() == ca.cert_pem
    assert stat.S_IMODE(pem.stat().st_mode) == 0o644


def test_a_file_of_another_user_is_not_replaced(tmp_path: Path) -> None:
    ca, shared, _victim = _setup(tmp_path)
    planted = shared / PEM_NAME
    planted.write_bytes(b"someone else's\n")
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(CAError, match="belongs to another user"):
        ca.export_trust_store(shared)
    assert planted.read_bytes() == b"someone else's\n"
