"""The little of an ELF file the probes need: function symbols, their code, file offsets.

Uprobes are placed by file offset, while symbols and call targets are virtual addresses;
the loadable segments translate one into the other.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

# Executables bigger than this are not read whole for their symbol table.
_MAX_SYMTAB_BYTES = 64 << 20
# Byte searches go in windows this big, so that a 100 MB file never keeps the GIL from
# the exec gate's answering thread for more than a millisecond or two.
_SEARCH_WINDOW = 4 << 20
_SYM64 = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
_SYMBOL_TYPES = {"STT_OBJECT": 1, "STT_FUNC": 2, "STT_GNU_IFUNC": 10}
# A name string that occurs more often than this in a string table is hostile input.
_MAX_NAME_HITS = 64


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


def find_windowed(view: mmap.mmap | bytes, needle: bytes, start: int = 0) -> int:
    """view.find(needle, start), a window at a time (the GIL is released in between)."""
    size = len(view)
    while start < size:
        end = min(size, start + _SEARCH_WINDOW + len(needle))
        found = view.find(needle, start, end)
        if found != -1:
            return found
        start += _SEARCH_WINDOW
    return -1


def contains_any(path: Path, needles: tuple[bytes, ...]) -> bool:
    """A cheap test before parsing: does the file contain any of these byte strings? All
    are looked for a window at a time, so that the plug-ins' order does not decide how
    much of a big file is read before one is found (node's SSL_write comes early)."""
    with mapped(path) as view:
        if view is None or not needles:
            return False
        longest = max(len(needle) for needle in needles)
        for start in range(0, len(view), _SEARCH_WINDOW):
            end = min(len(view), start + _SEARCH_WINDOW + longest)
            if any(view.find(needle, start, end) != -1 for needle in needles):
                return True
        return False


@dataclass(frozen=True, slots=True)
class _Section:
    name: str
    type: int
    address: int
    offset: int
    size: int
    link: int


_SHDR64 = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_PHDR64 = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SHT_SYMTAB, _SHT_NOBITS, _SHT_DYNSYM = 2, 8, 11
_MAX_SECTIONS = 4096


class ElfImage:
    """An opened ELF file; close() it (or use it as a context manager).

    Section headers are read here with struct, not through pyelftools' section objects:
    those parse whole hash tables on the way, which takes a third of a second in node."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream: BinaryIO = path.open("rb")
        try:
            self._size = os.fstat(self._stream.fileno()).st_size
            self._elf = ELFFile(self._stream)
            self.machine: str = self._elf["e_machine"]
            self._segments = self._read_segments()
            self._sections = self._read_sections()
        except (ELFError, ValueError, KeyError, struct.error) as exc:
            self._stream.close()
            raise ElfReadError(f"{path}: not a readable ELF file ({exc})") from exc
        self._plt = [
            (section.address, section.address + section.size)
            for section in self._sections.values()
            if section.name.startswith(".plt")
        ]

    def _read_segments(self) -> list[_Segment]:
        """The loadable segments (PT_LOAD), from the program headers."""
        if self._elf.elfclass != 64 or not self._elf.little_endian:
            raise ElfReadError(f"{self.path}: not a 64-bit little-endian ELF file")
        count, offset = self._elf["e_phnum"], self._elf["e_phoff"]
        if count > _MAX_SECTIONS or (count and self._elf["e_phentsize"] != _PHDR64.size):
            raise ElfReadError(f"{self.path}: {count} program headers of a strange size")
        table = self._bounded(offset, count * _PHDR64.size)
        segments = []
        for i in range(count):
            kind, flags, at, vaddr, _paddr, filesz, _memsz, _align = _PHDR64.unpack_from(
                table, i * _PHDR64.size
            )
            if kind == 1:  # PT_LOAD
                segments.append(_Segment(vaddr, at, filesz, bool(flags & 1)))  # PF_X
        return segments

    def _read_sections(self) -> dict[str, _Section]:
        """Every section header by name (the first of each name)."""
        if self._elf.elfclass != 64 or not self._elf.little_endian:
            raise ElfReadError(f"{self.path}: not a 64-bit little-endian ELF file")
        count, offset = self._elf["e_shnum"], self._elf["e_shoff"]
        if count > _MAX_SECTIONS or self._elf["e_shentsize"] != _SHDR64.size:
            raise ElfReadError(f"{self.path}: {count} section headers of a strange size")
        table = self._bounded(offset, count * _SHDR64.size)
        raw = [_SHDR64.unpack_from(table, i * _SHDR64.size) for i in range(count)]
        names_index = self._elf["e_shstrndx"]
        if not raw or names_index >= count:
            return {}
        names = self._bounded(raw[names_index][4], raw[names_index][5])
        sections: dict[str, _Section] = {}
        for name_at, kind, _flags, address, at, size, link, _info, _align, _entsize in raw:
            end = names.find(b"\0", name_at)
            name = names[name_at:end].decode("ascii", "replace") if end >= 0 else ""
            sections.setdefault(name, _Section(name, kind, address, at, size, link))
        return sections

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
        for table_name, table_type in ((".dynsym", _SHT_DYNSYM), (".symtab", _SHT_SYMTAB)):
            table = self._sections.get(table_name)
            if table is None or table.type != table_type or table.size > _MAX_SYMTAB_BYTES:
                continue
            for function in self._search_symbols(table, names - set(found), kinds):
                found.setdefault(function.name, function)
            if len(found) == len(names):
                break
        return found

    def _search_symbols(
        self, table: _Section, names: set[str], kinds: tuple[str, ...]
    ) -> Iterator[Function]:
        """The named symbols found by byte search, not by decoding every entry: node's
        .dynsym has 75,000 of them, which pyelftools takes seconds to walk. Each name is
        found in the string table (as "name\\0" or a versioned "name@", perhaps the tail of
        a longer string), then its offset as the st_name of an entry of the table."""
        by_index = list(self._sections.values())
        string_tables = [s for s in by_index if s.offset and s.type == 3]  # SHT_STRTAB
        strings_section = next(
            (
                s
                for s in string_tables
                if s.name == (".dynstr" if table.type == _SHT_DYNSYM else ".strtab")
            ),
            None,
        )
        if strings_section is None:
            return
        strings = self._bounded(strings_section.offset, strings_section.size)
        entries = self._bounded(table.offset, table.size)
        wanted_types = {_SYMBOL_TYPES[kind] for kind in kinds if kind in _SYMBOL_TYPES}
        entry_size = _SYM64.size
        for name in sorted(names):
            # Only a static executable's .symtab may carry versioned names ("name@@V").
            versioned = table.type == _SHT_SYMTAB
            for offset in _string_offsets(strings, name.encode(), versioned=versioned):
                key = struct.pack("<I", offset)
                position = entries.find(key)
                hits = 0
                while position != -1 and hits < _MAX_NAME_HITS:
                    hits += 1
                    if position % entry_size == 0 and position + entry_size <= len(entries):
                        _name, info, _other, shndx, value, size = _SYM64.unpack_from(
                            entries, position
                        )
                        if info & 0xF in wanted_types and shndx != 0 and value:
                            yield Function(name, value, size)
                            break
                    position = entries.find(key, position + 1)

    def _bounded(self, offset: int, size: int) -> bytes:
        """size bytes at offset, or ElfReadError when the file is not that long (a
        section header may claim anything)."""
        if offset < 0 or size < 0 or offset + size > self._size or size > _MAX_SYMTAB_BYTES:
            raise ElfReadError(f"{self.path}: a section lies outside the file")
        self._stream.seek(offset)
        return self._stream.read(size)

    def section(self, name: str) -> bytes | None:
        """A section's bytes; None when there is none (or it has no bytes in the file)."""
        section = self._sections.get(name)
        if section is None or section.type == _SHT_NOBITS:
            return None
        return self._bounded(section.offset, section.size)

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


def _string_offsets(strings: bytes, name: bytes, *, versioned: bool = True) -> list[int]:
    """Offsets in a string table where `name` is a whole string or its tail ("name\\0"),
    or a versioned "name@...": what an st_name may point at (bounded)."""
    found: list[int] = []
    for end in (b"\0", b"@") if versioned else (b"\0",):
        needle = name + end
        position = strings.find(needle)
        while position != -1 and len(found) < _MAX_NAME_HITS:
            found.append(position)
            position = strings.find(needle, position + 1)
    return found
