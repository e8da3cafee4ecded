"""What a TLS library plug-in declares, and the plan it makes for one file.

A plug-in (openssl.py, gotls.py, nodetls.py) says how to recognize a file (byte
signatures, then a look at its ELF image), where to probe it (its plan's sites) and what
to do once the probes are attached. attach.py knows plug-ins only through these types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from flowtap.loader.btf import Btf
from flowtap.tls.elf import ElfImage
from flowtap.tls.identity import FileKey
from flowtap.tls.placement import ProbeSite


class NotProbedError(Exception):
    """The file is this plug-in's, and it cannot be probed (the message says why, for the
    log); no other plug-in is tried."""


class ProbePlan(Protocol):
    """Where to probe one file."""

    @property
    def kind(self) -> str:
        """A short class for logs, stats and the exec classes' note ("internal", "go")."""
        ...

    def describe(self) -> str: ...

    def sites(self) -> list[ProbeSite]: ...


class AttachContext(Protocol):
    """What a plug-in may touch after its probes are attached."""

    def set_flag(self, name: str) -> None:
        """Sets a one-entry u32 array map to 1 (logged on failure)."""
        ...

    def update_map(self, name: str, key: bytes, value: bytes) -> None:
        """Raises BpfError."""
        ...

    def delete_map(self, name: str, key: bytes) -> None:
        """Deletes an entry if there is one (logged on failure)."""
        ...

    def btf(self) -> Btf: ...


P = TypeVar("P", bound=ProbePlan)
Undo = Callable[[], None]


class TlsLibrary(Protocol[P]):
    name: str  # as --tls-probes (and Qtap's flag) spells it
    source: str  # the records' capture_source
    source_enum: str  # its enum ft_source name in bpf/flowtap.h: what its BPF programs emit
    log_name: str  # "openssl probes attached to ..."
    signatures: tuple[bytes, ...]  # any of these makes a file worth parsing for it
    # Names (prefixes) of its shared libraries, looked up before any process maps them:
    # in the dynamic linker's cache at start and in each new root ("libssl.so").
    shared_libraries: tuple[str, ...]

    def classify(self, image: ElfImage, access: Path, *, internal: bool) -> P | None:
        """Its plan for the file, None when the file is not its (the next plug-in is
        tried); NotProbedError when it is, but cannot be probed."""
        ...

    def owns(self, image: ElfImage, access: Path) -> bool:
        """Whether the file is of this library's kind, probed or not: asked only when the
        plug-in is switched off, so that a later one does not take its files (node's
        OpenSSL would otherwise be probed by the openssl plug-in)."""
        ...

    def after_attach(
        self, plan: P, ctx: AttachContext, *, path: str, key: FileKey, target: str
    ) -> Undo | None:
        """Per-file state for its probes; returns what undoes it when they are removed
        (the file was deleted), None when there is nothing to undo."""
        ...


@dataclass(frozen=True, slots=True)
class TlsPlan(Generic[P]):
    """A file's plan and the plug-in that made it."""

    library: TlsLibrary[P]
    plan: P

    @property
    def kind(self) -> str:
        return self.plan.kind

    def describe(self) -> str:
        return self.plan.describe()

    def sites(self) -> list[ProbeSite]:
        return self.plan.sites()

    def after_attach(
        self, ctx: AttachContext, *, path: str, key: FileKey, target: str
    ) -> Undo | None:
        return self.library.after_attach(self.plan, ctx, path=path, key=key, target=target)
