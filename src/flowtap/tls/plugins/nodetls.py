"""Node.js: OpenSSL linked into `node`, probed as OpenSSL (node.py, docs/tls.md); what
this plug-in adds is node's version in the logs. Its records are OpenSSL's: the same BPF
programs emit them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flowtap.tls.elf import ElfImage
from flowtap.tls.identity import FileKey
from flowtap.tls.node import node_version
from flowtap.tls.placement import NotOpenSslError, Placement, plan
from flowtap.tls.plugins import openssl
from flowtap.tls.plugins.base import AttachContext


class NodeTls:
    name = "nodetls"
    source = "openssl"
    source_enum = "FT_SOURCE_OPENSSL"
    log_name = "openssl"
    signatures: tuple[bytes, ...] = openssl.SIGNATURES
    shared_libraries: tuple[str, ...] = ()  # executables only

    def classify(self, image: ElfImage, access: Path, *, internal: bool) -> Placement | None:
        # The version first: a byte search, cheaper than reading OpenSSL's code (node:
        # ~10 ms against ~16 ms), and found nowhere but in node.
        version = node_version(access)
        if version is None:
            return None
        try:
            return replace(plan(image, internal=internal), runtime=f"node {version}")
        except NotOpenSslError:
            return None

    def owns(self, image: ElfImage, access: Path) -> bool:
        return node_version(access) is not None

    def after_attach(
        self, plan: Placement, ctx: AttachContext, *, path: str, key: FileKey, target: str
    ) -> None:
        """Nothing: node's probes are OpenSSL's."""


NODETLS = NodeTls()
