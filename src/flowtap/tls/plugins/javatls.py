"""Java (JSSE): flowtap's own shim library, loaded into each JVM by flowtap's agent
(src/flowtap/java/). The JVM's TLS code is bytecode: nothing in it can be uprobed, so the
agent hands every piece of plaintext to flowtap_java_data() in the shim, which this
plug-in recognizes by its signature and probes at entry (bpf/sensor/javatls.bpf.c).

A copy of the shim already mapped by a JVM (an agent loaded by an earlier run of the
sensor) is found the same way, so a restarted sensor captures that JVM again without
loading anything into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flowtap.java import SHIM_SIGNATURE, SHIM_SYMBOL
from flowtap.tls.elf import ElfImage
from flowtap.tls.identity import FileKey
from flowtap.tls.placement import ProbeSite
from flowtap.tls.plugins.base import AttachContext, NotProbedError

PROGRAM = "java_data_enter"


@dataclass(frozen=True, slots=True)
class ShimPlacement:
    offset: int  # file offset of flowtap_java_data

    @property
    def kind(self) -> str:
        return "java"

    def describe(self) -> str:
        return f"flowtap Java agent shim ({SHIM_SYMBOL} at file offset {self.offset:#x})"

    def sites(self) -> list[ProbeSite]:
        return [ProbeSite(PROGRAM, self.offset)]


class JavaTls:
    name = "javassl"
    source = "java"
    source_enum = "FT_SOURCE_JAVA"
    log_name = "java"
    signatures: tuple[bytes, ...] = (SHIM_SIGNATURE,)
    shared_libraries: tuple[str, ...] = ()  # staged for each JVM by the sensor itself

    def classify(self, image: ElfImage, access: Path, *, internal: bool) -> ShimPlacement | None:
        if not image.find(SHIM_SIGNATURE):
            return None  # another plug-in's file (the signatures are searched all at once)
        found = image.functions({SHIM_SYMBOL}).get(SHIM_SYMBOL)
        if found is None:
            # The signature without the function: not a shim of this sensor's.
            raise NotProbedError(f"carries the Java shim's signature but no {SHIM_SYMBOL}")
        return ShimPlacement(image.file_offset(found.address))

    def owns(self, image: ElfImage, access: Path) -> bool:
        return bool(image.find(SHIM_SIGNATURE))

    def after_attach(
        self, plan: ShimPlacement, ctx: AttachContext, *, path: str, key: FileKey, target: str
    ) -> None:
        """Nothing: the descriptor each call passes finds its connection."""


JAVATLS = JavaTls()
