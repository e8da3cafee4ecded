"""The egress proxy's CA: files and permissions, leaves, trust store export."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from flowtap.proxy.ca import CA_CERT_NAME, CA_KEY_NAME, CAError, CertificateAuthority


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_private_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)  # ca.py calls os.open
    old = os.umask(0)  # the key must be private whatever the umask
    try:
        ca = CertificateAuthority.load_or_create(tmp_path / "state")
    finally:
        os.umask(old)
    state = tmp_path / "state"
    assert _mode(state) == 0o700
    assert _mode(state / CA_KEY_NAME) == 0o600
    key_opens = [o for o in opened if o[0].endswith(CA_KEY_NAME)]
    # Created exclusively, with 0600 from the start: never readable by others in between.
    assert len(key_opens) == 1
    _, flags, mode = key_opens[0]
    assert flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600
    cert = x509.load_pem_x509_certificate((state / CA_CERT_NAME).read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert ca.key.curve.name == "secp256r1"


def test_second_start_loads_the_same_ca(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path)
    second = CertificateAuthority.load_or_create(tmp_path)
    assert first.cert_pem == second.cert_pem


def test_corrupt_key_says_what_to_do(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / CA_KEY_NAME).write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(CAError, match=r"corrupt.*remove"):
        CertificateAuthority.load_or_create(tmp_path)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    os.chmod(tmp_path / CA_KEY_NAME, 0o644)
    with pytest.raises(CAError, match="chmod 600"):
        CertificateAuthority.load_or_create(tmp_path)


def test_open_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "open"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    with pytest.raises(CAError, match="chmod 700"):
        CertificateAuthority.load_or_create(state)


def test_unwritable_state_dir_is_explained(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CAError, match="cannot create the CA state directory"):
        CertificateAuthority.load_or_create(blocker / "state")


def test_leaf_for_a_name(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    leaf = ca.leaf("api.example.test")
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.test"]
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=8)
    key = x509.load_pem_x509_certificate(leaf.cert_pem).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_leaf_for_an_ip_has_an_ip_san(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    cert = x509.load_pem_x509_certificate(ca.leaf("127.0.0.1").cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == []


def test_leaves_are_cached_lru(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, cache_size=2)
    a = ca.leaf("a.test")
    assert ca.leaf("A.test") is a  # names are case-insensitive
    assert ca.leaves_signed == 1
    ca.leaf("b.test")
    ca.leaf("a.test")  # a is now the most recent
    ca.leaf("c.test")  # evicts b
    assert ca.cached("a.test") and ca.cached("c.test") and not ca.cached("b.test")
    assert ca.leaves_signed == 3


def test_export_trust_store(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state")
    written = ca.export_trust_store(tmp_path / "trust")
    pem = tmp_path / "trust" / "flowtap-ca.pem"
    assert pem in written
    assert pem.read_bytes() == ca.cert_pem
    assert _mode(pem) == 0o644
    keytool = shutil.which("keytool")
    if keytool is None:
        assert len(written) == 1
        return
    jks = tmp_path / "trust" / "flowtap-ca.jks"
    assert jks in written
    listing = subprocess.run(
        [keytool, "-list", "-keystore", str(jks), "-storepass", "changeit"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0 and "flowtap-ca" in listing.stdout
    # A second export replaces the store (keytool alone would refuse the existing alias).
    assert jks in ca.export_trust_store(tmp_path / "trust")


def test_export_to_unwritable_place_is_explained(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CAError, match="cannot write the trust store"):
        ca.export_trust_store(blocker / "trust")
