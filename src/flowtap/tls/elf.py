"""The little of an ELF file the probes need: function symbols, their code, file offsets.

Uprobes are placed by file offset, while symbols and call targets are virtual addresses;
the loadable segments translate one into the other.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

# Executables bigger than this are not read whole for their symbol table.
_MAX_SYMTAB_BYTES = 64 << 20


class ElfReadError(Exception):
    """The file is not an ELF file this sensor can read (reason in the message)."""


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    address: int  # virtual address, as in the symbol table
    size: int


@dataclass(frozen=True, slots=True)
class _Segment:
    vaddr: int
    offset: int
    filesz: int
    executable: bool


@contextmanager
def mapped(path: Path) -> Iterator[mmap.mmap | None]:
    """The file's bytes, mapped read-only (None for an empty file, which cannot be)."""
    with path.open("rb") as stream:
        try:
            view = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            yield None
            return
        with view:
            yield view


def contains_any(path: Path, needles: tuple[bytes, ...]) -> bool:
    """A cheap test before parsing: does the file contain any of these byte strings?"""
    with mapped(path) as view:
        return view is not None and any(view.find(needle) != -1 for needle in needles)


class ElfImage:
    """An opened ELF file; close() it (or use it as a context manager)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream: BinaryIO = path.open("rb")
        try:
            self._elf = ELFFile(self._stream)
            self.machine: str = self._elf["e_machine"]
            self._segments = [
                _Segment(
                    seg["p_vaddr"],
                    seg["p_offset"],
                    seg["p_filesz"],
                    bool(seg["p_flags"] & 1),  # PF_X
                )
                for seg in self._elf.iter_segments()
                if seg["p_type"] == "PT_LOAD"
            ]
        except (ELFError, ValueError, KeyError) as exc:
            self._stream.close()
            raise ElfReadError(f"{path}: not a readable ELF file ({exc})") from exc
        self._plt = [
            (section["sh_addr"], section["sh_addr"] + section["sh_size"])
            for section in self._elf.iter_sections()
            if section.name.startswith(".plt")
        ]

    def __enter__(self) -> ElfImage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()

    @property
    def position_independent(self) -> bool:
        return bool(self._elf["e_type"] == "ET_DYN")

    def functions(
        self, names: set[str], kinds: tuple[str, ...] = ("STT_FUNC", "STT_GNU_IFUNC")
    ) -> dict[str, Function]:
        """The defined symbols of those kinds among names (functions by default), from
        .dynsym, then .symtab (static builds)."""
        found: dict[str, Function] = {}
        for table_name in (".dynsym", ".symtab"):
            table = self._elf.get_section_by_name(table_name)
            if not isinstance(table, SymbolTableSection):
                continue
            if table_name == ".symtab" and table["sh_size"] > _MAX_SYMTAB_BYTES:
                continue
            for symbol in table.iter_symbols():
                name = symbol.name.split("@", 1)[0]
                if (
                    name in names
                    and name not in found
                    and symbol["st_info"]["type"] in kinds
                    and symbol["st_shndx"] != "SHN_UNDEF"
                    and symbol["st_value"]
                ):
                    found[name] = Function(name, symbol["st_value"], symbol["st_size"])
            if len(found) == len(names):
                break
        return found

    def section(self, name: str) -> bytes | None:
        """A section's bytes; None when there is none (or it has no bytes in the file)."""
        section = self._elf.get_section_by_name(name)
        if section is None or section["sh_type"] == "SHT_NOBITS":
            return None
        data: bytes = section.data()
        return data

    def section_span(self, name: str) -> tuple[int, int] | None:
        """A section's virtual address and size; None when there is no such section."""
        section = self._elf.get_section_by_name(name)
        if section is None:
            return None
        return int(section["sh_addr"]), int(section["sh_size"])

    def find(self, needle: bytes, limit: int = 1) -> list[int]:
        """File offsets of up to `limit` occurrences of needle in the whole file."""
        found: list[int] = []
        with mapped(self.path) as view:
            position = -1
            while view is not None and len(found) < limit:
                position = view.find(needle, position + 1)
                if position < 0:
                    break
                found.append(position)
        return found

    def read(self, address: int, length: int) -> bytes:
        """Exactly length bytes from a virtual address in the file (data or code)."""
        data = self.code(address, length)
        if len(data) != length:
            raise ElfReadError(f"{self.path}: {length} bytes at {address:#x} run past a segment")
        return data

    def read_file(self, offset: int, length: int) -> bytes:
        self._stream.seek(offset)
        return self._stream.read(length)

    def file_offset(self, address: int) -> int:
        """Where the byte at a virtual address lies in the file (the uprobe offset)."""
        for seg in self._segments:
            if seg.vaddr <= address < seg.vaddr + seg.filesz:
                return address - seg.vaddr + seg.offset
        raise ElfReadError(f"{self.path}: address {address:#x} is in no loadable segment")

    def is_executable_code(self, address: int) -> bool:
        return any(
            seg.executable and seg.vaddr <= address < seg.vaddr + seg.filesz
            for seg in self._segments
        )

    def in_plt(self, address: int) -> bool:
        return any(start <= address < end for start, end in self._plt)

    def code(self, address: int, length: int) -> bytes:
        """Up to length bytes of code from a virtual address (less at a segment's end)."""
        for seg in self._segments:
            if seg.vaddr <= address < seg.vaddr + seg.filesz:
                available = min(length, seg.vaddr + seg.filesz - address)
                self._stream.seek(address - seg.vaddr + seg.offset)
                return self._stream.read(available)
        raise ElfReadError(f"{self.path}: address {address:#x} is in no loadable segment")
