"""OpenSSL: the shared libssl, or OpenSSL linked into an executable (placement.py)."""

from __future__ import annotations

from pathlib import Path

from flowtap.tls.elf import ElfImage
from flowtap.tls.identity import FileKey
from flowtap.tls.placement import NotOpenSslError, Placement, plan
from flowtap.tls.plugins.base import AttachContext

SIGNATURES = (b"SSL_write\0", b"SSL_read\0")


class OpenSsl:
    name = "openssl"
    source = "openssl"
    source_enum = "FT_SOURCE_OPENSSL"
    log_name = "openssl"
    signatures: tuple[bytes, ...] = SIGNATURES
    shared_libraries: tuple[str, ...] = ("libssl.so",)

    def classify(self, image: ElfImage, access: Path, *, internal: bool) -> Placement | None:
        try:
            return plan(image, internal=internal)
        except NotOpenSslError:
            return None

    def owns(self, image: ElfImage, access: Path) -> bool:
        return False  # the last one tried: nothing after it to keep away

    def after_attach(
        self, plan: Placement, ctx: AttachContext, *, path: str, key: FileKey, target: str
    ) -> None:
        """Nothing: the OpenSSL probes need no per-file state in the kernel."""


OPENSSL = OpenSsl()
