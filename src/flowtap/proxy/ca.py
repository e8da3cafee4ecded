"""The local certificate authority of the egress proxy.

Created at first start in a state directory (mode 0700): an EC P-256 key, written with
owner-only permissions from the very first byte (``O_CREAT|O_EXCL`` with mode 0600, never
chmod-ed afterwards), and a self-signed CA certificate. Leaf certificates for the names
clients ask for (SNI, or the destination IP when there is none) are signed on demand,
short-lived, and cached.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowtap import safefile

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "JKS_NAME",
    "PEM_NAME",
    "CAError",
    "CertificateAuthority",
    "Leaf",
]

CA_KEY_NAME = "ca-key.pem"
CA_CERT_NAME = "ca-cert.pem"
PEM_NAME = "flowtap-ca.pem"
JKS_NAME = "flowtap-ca.jks"
JKS_PASSWORD = "changeit"  # the JDK's customary trust store password; the store holds no secret

_CA_VALIDITY = datetime.timedelta(days=3650)
_LEAF_VALIDITY = datetime.timedelta(days=7)
# Clocks of clients may lag ours; a leaf valid from "now" would be rejected by them.
_BACKDATE = datetime.timedelta(hours=1)
# A cached leaf this close to its expiry is signed again.
_RENEW_BEFORE = datetime.timedelta(days=1)
_MAX_CN = 64  # RFC 5280 ub-common-name


class CAError(RuntimeError):
    """The CA cannot be created, loaded or exported; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Leaf:
    """A leaf certificate and its key, PEM-encoded (the key unencrypted, PKCS#8)."""

    name: str
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or check that an existing one is private."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise CAError(
            f"cannot create the CA state directory {path}: {exc.strerror}; "
            "choose a writable directory or run as the user that owns it"
        ) from exc
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise CAError(
            f"the CA state directory {path} is readable by others (mode "
            f"{st.st_mode & 0o777:o}, owner {st.st_uid}): it holds the CA's private key; "
            f"run `chmod 700 {path}` (and chown it to this user) or choose another directory"
        )


def _write_private(path: Path, data: bytes) -> None:
    """Write a new file readable by its owner only, from the moment it exists."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    """Replace a world-readable file atomically (readers never see half of it), safe in a
    directory others can write (safefile: no link followed, no file of another user's
    replaced)."""
    safefile.replace(path, data, mode=0o644)  # clients must read it


class CertificateAuthority:
    """A CA key and certificate, and a cache of the leaves it signed.

    Thread-safe: leaves may be signed from an executor while the event loop reads the cache.
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        *,
        directory: Path | None = None,
        cache_size: int = 1024,
    ) -> None:
        self.key = key
        self.cert = cert
        self.directory = directory
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        self._cache: OrderedDict[str, Leaf] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self._lock = threading.Lock()
        self.leaves_signed = 0

    # -- creation ---------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, directory: str | os.PathLike[str], *, cache_size: int = 1024
    ) -> CertificateAuthority:
        """The CA kept in ``directory``, created there first if it is not there yet."""
        path = Path(directory)
        _private_dir(path)
        key_path, cert_path = path / CA_KEY_NAME, path / CA_CERT_NAME
        key = cls._load_or_create_key(key_path)
        cert: x509.Certificate | None = None
        if cert_path.exists():
            cert = cls._load_cert(cert_path, key)
        if cert is None:  # first start, or a start that died between the two files
            cert = cls._self_signed(key)
            _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, directory=path, cache_size=cache_size)

    @staticmethod
    def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_private(path, pem)
            return key
        except FileExistsError:
            pass  # an earlier start made it: load it below
        except OSError as exc:
            raise CAError(
                f"cannot write the CA key {path}: {exc.strerror}; "
                "make the state directory writable or choose another one"
            ) from exc
        st = path.stat()
        if st.st_mode & 0o077:
            raise CAError(
                f"the CA key {path} is readable by others (mode {st.st_mode & 0o777:o}): "
                f"run `chmod 600 {path}`, or remove it so that a new CA is made "
                "(clients must then trust the new CA certificate)"
            )
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CAError(
                f"the CA key {path} is corrupt or encrypted ({exc}); remove {path} and "
                f"{path.with_name(CA_CERT_NAME)} to make a new CA (clients must then "
                "trust the new CA certificate)"
            ) from exc
        except OSError as exc:
            raise CAError(f"cannot read the CA key {path}: {exc.strerror}") from exc
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CAError(f"the CA key {path} is not an EC key; remove it to make a new CA")
        return loaded

    @staticmethod
    def _load_cert(path: Path, key: ec.EllipticCurvePrivateKey) -> x509.Certificate | None:
        """The stored CA certificate, or None when it does not belong to ``key``."""
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError as exc:
            raise CAError(
                f"the CA certificate {path} is corrupt ({exc}); remove it and it is made "
                "again from the key"
            ) from exc
        if cert.public_key() != key.public_key():
            raise CAError(
                f"the CA certificate {path} does not match the key beside it; remove both "
                "to make a new CA (clients must then trust the new CA certificate)"
            )
        if cert.not_valid_after_utc - _now() < _RENEW_BEFORE:
            return None  # expired (or nearly): sign a new one with the same key
        return cert

    @staticmethod
    def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowtap"),
                x509.NameAttribute(NameOID.COMMON_NAME, "flowtap local egress CA"),
            ]
        )
        now = _now()
        public = key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )

    # -- leaves -----------------------------------------------------------------------

    def leaf(self, name: str) -> Leaf:
        """A leaf for a host name or an IP address literal, from the cache when fresh."""
        key = name.lower()
        with self._lock:
            leaf = self._cache.get(key)
            if leaf is not None and leaf.not_after - _now() > _RENEW_BEFORE:
                self._cache.move_to_end(key)
                return leaf
        leaf = self._sign_leaf(name)
        with self._lock:
            self._cache[key] = leaf
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return leaf

    def cached(self, name: str) -> bool:
        with self._lock:
            return name.lower() in self._cache

    def _sign_leaf(self, name: str) -> Leaf:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + _LEAF_VALIDITY, self.cert.not_valid_after_utc)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowtap")]
        if len(name) <= _MAX_CN:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        with self._lock:
            self.leaves_signed += 1
        return Leaf(
            name=name,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            not_after=not_after,
        )

    # -- trust store ------------------------------------------------------------------

    def export_trust_store(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the CA certificate for clients to trust: ``flowtap-ca.pem`` and, when
        ``keytool`` is on PATH, the Java keystore ``flowtap-ca.jks`` (password
        ``changeit``). Returns the files written."""
        path = Path(directory)
        try:
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
            pem = path / PEM_NAME
            _write_public(pem, self.cert_pem)
        except OSError as exc:
            hint = (
                " (run as root or choose another directory)"
                if not isinstance(exc, safefile.UnsafeFileError)
                and exc.errno
                in (
                    errno.EACCES,
                    errno.EPERM,
                    errno.EROFS,
                )
                else ""
            )
            raise CAError(f"cannot write the trust store to {path}: {exc.strerror}{hint}") from exc
        written = [pem]
        keytool = shutil.which("keytool")
        if keytool is not None:
            written.append(self._export_jks(keytool, self.cert_pem, path / JKS_NAME))
        return written

    @staticmethod
    def _export_jks(keytool: str, cert_pem: bytes, jks: Path) -> Path:
        # keytool writes in a private directory of its own (it follows links and keeps
        # modes), from our bytes rather than from the trust store's pem, which others may
        # be able to swap; the store is then put in place like the pem.
        with tempfile.TemporaryDirectory(prefix="flowtap-jks-") as private:
            pem, tmp = Path(private) / PEM_NAME, Path(private) / JKS_NAME
            pem.write_bytes(cert_pem)
            command = [
                keytool,
                "-importcert",
                "-noprompt",
                "-alias",
                "flowtap-ca",
                "-file",
                str(pem),
                "-keystore",
                str(tmp),
                "-storetype",
                "JKS",
                "-storepass",
                JKS_PASSWORD,
            ]
            try:
                done = subprocess.run(
                    command, check=False, capture_output=True, text=True, timeout=60
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise CAError(f"keytool failed to write {jks}: {exc}") from exc
            if done.returncode != 0:
                raise CAError(
                    f"keytool failed to write {jks} (exit {done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()}"
                )
            store = tmp.read_bytes()
        try:
            _write_public(jks, store)
        except OSError as exc:
            raise CAError(f"cannot write the trust store {jks}: {exc}") from exc
        return jks
