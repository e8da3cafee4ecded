"""What a Go executable says about itself to its own runtime: the module data, the itabs the
linker made, and the type descriptors that reflect reads. Every Go executable keeps them,
stripped or not, because the runtime needs them; flowtap reads itab addresses and struct
field offsets from them, instead of trusting a table per release.

Layouts on amd64, read off runtime/symtab.go and internal/abi/type.go of Go 1.17 to 1.27:
- moduledata: pcHeader, six slices, findfunctab, minpc, maxpc, then text (word 22) ...
  enoptrbss (word 31); covctrs and ecovctrs since 1.20; then end, gcdata, gcbss, types.
  While the linker writes a .itablink section (to Go 1.26), an itablinks slice that
  points into it lists the itabs; Go 1.27 has no such section, but typedesclen after
  types, and the itabs lie one after another at types + itaboffset (itabsize bytes).
- a type descriptor (abi.Type, 48 bytes): tflag at +20, kind at +23, its name's offset
  from `types` at +40; a pointer type's element at +48; a struct's fields at +56 (slice),
  each (name pointer, type pointer, offset), the offset shifted left by one before 1.19.
- an itab: interface type at +0, concrete type at +8, methods from +24.
Whatever does not fit these shapes raises GoRuntimeError: the caller falls back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from flowtap.tls.elf import ElfImage, ElfReadError

_MODULEDATA_WORDS = 64
_TEXT_WORD = 22
_END_WORD_BEFORE_120 = 32  # `end`; covctrs and ecovctrs come before it since Go 1.20
_END_WORD = 34
_TYPE_TFLAG, _TYPE_KIND, _TYPE_STR, _TYPE_ELEM, _TYPE_FIELDS = 20, 23, 40, 48, 56
_KIND_MASK = 0x1F
KIND_INTERFACE, KIND_PTR, KIND_STRUCT = 20, 22, 25
_TFLAG_EXTRA_STAR = 0x2
_ITAB_SIZE = 32  # inter, type, hash (+pad), fun[0]
_FIELD_SIZE = 24
# Bounds against a damaged or hostile file: loops and reads stay small.
_MAX_ITABS = 1 << 16
_MAX_FIELDS = 1 << 10
_MAX_NAME = 1 << 10
_MAX_CANDIDATES = 8


class GoRuntimeError(Exception):
    """The runtime's own data is not where or what this reader expects (message: why)."""


@dataclass(frozen=True, slots=True)
class ModuleData:
    text: int  # where function entries count from (pcHeader's textStart is 0 since 1.26)
    types: int  # type names are offsets from here
    itabs: tuple[int, ...]


def _u64(data: bytes, offset: int = 0) -> int:
    value: int = struct.unpack_from("<Q", data, offset)[0]
    return value


class GoRuntime:
    """Reads itabs and type descriptors of one opened Go executable (not position
    independent: the addresses in its data are final only when it is not)."""

    def __init__(self, image: ElfImage, version: tuple[int, int]) -> None:
        self._image = image
        self._version = version
        self.module = find_moduledata(image, version)

    def _read(self, address: int, length: int) -> bytes:
        try:
            return self._image.read(address, length)
        except ElfReadError as exc:
            raise GoRuntimeError(str(exc)) from exc

    def _word(self, address: int) -> int:
        return _u64(self._read(address, 8))

    def name(self, address: int) -> str:
        """An abi.Name: a flags byte, the length as a varint, then the bytes."""
        head = self._read(address, 1 + 4)
        length, shift, pos = 0, 0, 1
        while True:
            if pos >= len(head):
                raise GoRuntimeError(f"name at {address:#x}: its length never ends")
            byte = head[pos]
            length |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not byte & 0x80:
                break
        if length > _MAX_NAME:
            raise GoRuntimeError(f"name at {address:#x}: {length} bytes long")
        return self._read(address + pos, length).decode("utf-8", "replace")

    def kind(self, rtype: int) -> int:
        return self._read(rtype + _TYPE_KIND, 1)[0] & _KIND_MASK

    def type_name(self, rtype: int) -> str:
        """As reflect prints it: "*net.TCPConn", "net.Conn"."""
        header = self._read(rtype + _TYPE_TFLAG, 1)[0]
        offset = struct.unpack("<i", self._read(rtype + _TYPE_STR, 4))[0]
        text = self.name(self.module.types + offset)
        return text[1:] if header & _TFLAG_EXTRA_STAR else text

    def elem(self, pointer_type: int) -> int:
        """The type a pointer type points at."""
        self._expect_kind(pointer_type, KIND_PTR)
        return self._word(pointer_type + _TYPE_ELEM)

    def field(self, struct_type: int, name: str) -> tuple[int, int]:
        """(offset, type descriptor) of a struct's field."""
        self._expect_kind(struct_type, KIND_STRUCT)
        fields = self._read(struct_type + _TYPE_FIELDS, 16)
        array, count = _u64(fields), _u64(fields, 8)
        if count > _MAX_FIELDS:
            raise GoRuntimeError(f"struct at {struct_type:#x}: {count} fields")
        for index in range(count):
            entry = self._read(array + index * _FIELD_SIZE, _FIELD_SIZE)
            name_ptr, rtype, offset = struct.unpack("<3Q", entry)
            if self.name(name_ptr) == name:
                # Before Go 1.19 the low bit said "embedded".
                return (offset >> 1 if self._version < (1, 19) else offset), rtype
        raise GoRuntimeError(f"{self.type_name(struct_type)} has no field {name}")

    def _expect_kind(self, rtype: int, kind: int) -> None:
        found = self.kind(rtype)
        if found != kind:
            raise GoRuntimeError(f"type at {rtype:#x} is of kind {found}, not {kind}")

    def itab(self, concrete: str, interface: str) -> int | None:
        """The address of the itab for (concrete type, interface), as "*net.TCPConn" and
        "net.Conn"; None when the linker made none."""
        for itab in self.module.itabs:
            inter, rtype = struct.unpack("<2Q", self._read(itab, 16))
            if self.type_name(rtype) == concrete and self.type_name(inter) == interface:
                return itab
        return None

    def itab_type(self, itab: int) -> int:
        return self._word(itab + 8)


def find_moduledata(image: ElfImage, version: tuple[int, int]) -> ModuleData:
    """The first module's data: in .go.module when there is one, else found by its first
    word, which points at .gopclntab."""
    for words in _moduledata_candidates(image):
        if _looks_like_moduledata(image, words):
            return _parse_moduledata(image, version, words)
    raise GoRuntimeError("no moduledata found")


def _moduledata_candidates(image: ElfImage) -> list[list[int]]:
    size = _MODULEDATA_WORDS * 8
    section = image.section(".go.module")
    if section is not None and len(section) >= size:
        return [list(struct.unpack_from(f"<{_MODULEDATA_WORDS}Q", section))]
    pclntab = image.section_span(".gopclntab")
    if pclntab is None:
        raise GoRuntimeError("no .gopclntab section")
    candidates = []
    for offset in image.find(struct.pack("<Q", pclntab[0]), limit=_MAX_CANDIDATES):
        data = image.read_file(offset, size)
        if len(data) == size:
            candidates.append(list(struct.unpack(f"<{_MODULEDATA_WORDS}Q", data)))
    return candidates


def _looks_like_moduledata(image: ElfImage, words: list[int]) -> bool:
    text, etext = words[_TEXT_WORD], words[_TEXT_WORD + 1]
    return text < etext and image.is_executable_code(text)


def _parse_moduledata(image: ElfImage, version: tuple[int, int], words: list[int]) -> ModuleData:
    end = _END_WORD if version >= (1, 20) else _END_WORD_BEFORE_120
    types = words[end + 3]
    links = image.section_span(".itablink")
    if links is not None:
        itabs = _listed_itabs(image, words[end + 4 : end + 20], links)
    else:
        # Go 1.27: types, typedesclen, etypes, itaboffset, itabsize.
        typedesclen, etypes, itaboffset, itabsize = words[end + 4 : end + 8]
        if not (types < etypes and typedesclen <= etypes - types):
            raise GoRuntimeError("neither an itablinks slice nor an itab region")
        if itaboffset + itabsize > etypes - types:
            raise GoRuntimeError("the itab region runs past the types")
        itabs = _region_itabs(image, types + itaboffset, itabsize)
    return ModuleData(words[_TEXT_WORD], types, itabs)


def _listed_itabs(image: ElfImage, words: list[int], links: tuple[int, int]) -> tuple[int, ...]:
    """The itablinks slice: the first (pointer, length, capacity) after etypes that points
    into .itablink (textsectmap and typelinks come before it)."""
    start, size = links
    for index in range(len(words) - 2):
        pointer, length, capacity = words[index : index + 3]
        fits = start <= pointer and pointer + 8 * length <= start + size
        if length == capacity and 0 < length <= _MAX_ITABS and fits:
            data = image.read(pointer, 8 * length)
            return struct.unpack(f"<{length}Q", data)
    raise GoRuntimeError("no itablinks slice into .itablink")


def _region_itabs(image: ElfImage, start: int, size: int) -> tuple[int, ...]:
    """Itabs laid one after another, each 32 bytes plus 8 per method beyond the first
    (abi.ITab.Size; only 32 when fun[0] is 0)."""
    itabs: list[int] = []
    address, end = start, start + size
    while address < end and len(itabs) < _MAX_ITABS:
        inter, _rtype, _hash, fun0 = struct.unpack("<QQQQ", image.read(address, _ITAB_SIZE))
        itabs.append(address)
        methods = _u64(image.read(inter + _TYPE_FIELDS + 8, 8)) if fun0 else 1
        address += _ITAB_SIZE + 8 * (max(methods, 1) - 1)
    return tuple(itabs)
