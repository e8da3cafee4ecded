"""Record layouts read from the BTF of a compiled BPF object.

bpf/flowtap.h is the single definition of every record; clang writes its exact layout
(offsets, sizes, enum values) into the object's BTF, and this module turns that into
`struct.Struct` unpackers. Python never restates an offset.
"""

from __future__ import annotations

import ctypes
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from flowtap.loader.errors import BpfError
from flowtap.loader.libbpf import BpfObject, lib

_KIND_INT, _KIND_PTR, _KIND_ARRAY, _KIND_STRUCT = 1, 2, 3, 4
_KIND_ENUM, _KIND_DATASEC = 6, 15
_INT_SIGNED = 1
_UNSIGNED_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIGNED_FORMATS = {1: "b", 2: "h", 4: "i", 8: "q"}


class _BtfType(ctypes.Structure):
    _fields_ = (
        ("name_off", ctypes.c_uint32),
        ("info", ctypes.c_uint32),
        ("size_or_type", ctypes.c_uint32),
    )


class _BtfMember(ctypes.Structure):
    _fields_ = (
        ("name_off", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
    )


class _BtfArray(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("index_type", ctypes.c_uint32),
        ("nelems", ctypes.c_uint32),
    )


class _BtfEnum(ctypes.Structure):
    _fields_ = (("name_off", ctypes.c_uint32), ("val", ctypes.c_int32))


_BtfVarSecinfo = _BtfArray  # {type, offset, size}: same shape


class Fields:
    """One unpacked struct: typed access by field name, without copying into a dict."""

    __slots__ = ("_layout", "_values")

    def __init__(self, layout: StructLayout, values: tuple[Any, ...]) -> None:
        self._layout = layout
        self._values = values

    def integer(self, name: str) -> int:
        value: int = self._values[self._layout.int_fields[name]]
        return value

    def raw(self, name: str) -> bytes:
        value: bytes = self._values[self._layout.bytes_fields[name]]
        return value

    def __getitem__(self, name: str) -> int | bytes:
        return self._values[self._layout.index[name]]  # type: ignore[no-any-return]

    def as_dict(self) -> dict[str, int | bytes]:
        return dict(zip(self._layout.names, self._values, strict=True))


@dataclass(frozen=True)
class StructLayout:
    """A C struct flattened to named fields; nested members are named `outer.inner`."""

    name: str
    size: int
    names: tuple[str, ...]
    codec: struct.Struct
    index: dict[str, int] = field(init=False, repr=False, compare=False)
    int_fields: dict[str, int] = field(init=False, repr=False, compare=False)
    bytes_fields: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        formats = _field_formats(self.codec.format)
        index = {name: i for i, name in enumerate(self.names)}
        bytes_names = {name for name, fmt in zip(self.names, formats, strict=True) if "s" in fmt}
        object.__setattr__(self, "index", index)
        object.__setattr__(
            self, "int_fields", {n: i for n, i in index.items() if n not in bytes_names}
        )
        object.__setattr__(self, "bytes_fields", {n: index[n] for n in bytes_names})

    def unpack(self, data: bytes) -> Fields:
        if len(data) < self.size:
            raise ValueError(f"{self.name}: {len(data)} bytes, need {self.size}")
        return Fields(self, self.codec.unpack_from(data))

    def head(self) -> StructLayout:
        """The struct without its last field: the fixed part of a record sent at its real
        length (a trailing array of which only some bytes are valid)."""
        last = _field_formats(self.codec.format)[-1]
        fmt = re.sub(r"\d*x$", "", self.codec.format)
        if not fmt.endswith(last):
            raise ValueError(f"{self.name}: cannot split off its last field")
        codec = struct.Struct(fmt[: -len(last)])
        return StructLayout(self.name + " head", codec.size, self.names[:-1], codec)

    def pack(self, values: dict[str, int | bytes]) -> bytes:
        """Builds the struct's bytes; fields not given are zero."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise KeyError(f"{self.name} has no field(s) {sorted(unknown)}")
        defaults: dict[str, int | bytes] = {
            name: b"" if name in self.bytes_fields else 0 for name in self.names
        }
        defaults.update(values)
        return self.codec.pack(*(defaults[name] for name in self.names))


def _field_formats(fmt: str) -> list[str]:
    """Splits a '<' format with 'x' padding into one format per real field."""
    out: list[str] = []
    count = ""
    for ch in fmt.lstrip("<"):
        if ch.isdigit():
            count += ch
            continue
        if ch != "x":
            out.append(count + ch)
        count = ""
    return out


class Btf:
    """Reads struct, enum and data-section layouts from a BPF object's BTF."""

    def __init__(self, obj: BpfObject) -> None:
        self._btf = obj.btf_ptr
        self._path = obj.path

    def _type(self, type_id: int) -> _BtfType:
        ptr = lib().btf__type_by_id(self._btf, type_id)
        if not ptr:
            raise BpfError(f"BTF type {type_id} missing in {self._path}", fix="rebuild with -g")
        return _BtfType.from_address(ptr)

    def _name(self, offset: int) -> str:
        raw: bytes | None = lib().btf__name_by_offset(self._btf, offset)
        return raw.decode() if raw else ""

    def _find(self, name: str, kind: int) -> int:
        type_id: int = lib().btf__find_by_name_kind(self._btf, name.encode(), kind)
        if type_id <= 0:
            raise BpfError(
                f"type {name!r} not in the BTF of {self._path}",
                fix="rebuild the BPF objects (`make bpf`); the object and package disagree",
            )
        return type_id

    def _resolve(self, type_id: int) -> int:
        resolved: int = lib().btf__resolve_type(self._btf, type_id)
        if resolved < 0:
            raise BpfError(f"cannot resolve BTF type {type_id} in {self._path}")
        return resolved

    def struct_layout(self, name: str) -> StructLayout:
        type_id = self._find(name, _KIND_STRUCT)
        fields: list[tuple[str, int, str]] = []
        self._flatten(type_id, "", 0, fields)
        size = self._type(type_id).size_or_type
        fmt = "<"
        position = 0
        for _field_name, offset, field_fmt in fields:
            if offset > position:
                fmt += f"{offset - position}x"
            fmt += field_fmt
            position = offset + struct.calcsize("<" + field_fmt)
        if size > position:
            fmt += f"{size - position}x"
        codec = struct.Struct(fmt)
        if codec.size != size:
            raise BpfError(f"layout of {name} came out {codec.size} bytes, BTF says {size}")
        return StructLayout(name, size, tuple(f[0] for f in fields), codec)

    def _flatten(
        self, type_id: int, prefix: str, base: int, out: list[tuple[str, int, str]]
    ) -> None:
        header = self._type(type_id)
        vlen = header.info & 0xFFFF
        kflag = header.info >> 31
        members = (_BtfMember * vlen).from_address(ctypes.addressof(header) + 12)
        for member in members:
            bit_offset = member.offset & 0xFFFFFF if kflag else member.offset
            if bit_offset % 8:
                raise BpfError(f"bitfields are not supported in shared records ({prefix})")
            name = prefix + self._name(member.name_off)
            offset = base + bit_offset // 8
            self._member(member.type, name, offset, out)

    def _member(
        self, type_id: int, name: str, offset: int, out: list[tuple[str, int, str]]
    ) -> None:
        resolved = self._resolve(type_id)
        header = self._type(resolved)
        kind = (header.info >> 24) & 0x1F
        if kind == _KIND_STRUCT:
            self._flatten(resolved, name + ".", offset, out)
        elif kind == _KIND_ARRAY:
            array = _BtfArray.from_address(ctypes.addressof(header) + 12)
            elem_size = lib().btf__resolve_size(self._btf, array.type)
            out.append((name, offset, f"{array.nelems * elem_size}s"))
        elif kind in (_KIND_INT, _KIND_ENUM, _KIND_PTR):
            size = header.size_or_type if kind != _KIND_PTR else 8
            signed = False
            if kind == _KIND_INT:
                encoding = ctypes.c_uint32.from_address(ctypes.addressof(header) + 12).value
                signed = bool((encoding >> 24) & _INT_SIGNED)
            formats = _SIGNED_FORMATS if signed else _UNSIGNED_FORMATS
            out.append((name, offset, formats[size]))
        else:
            raise BpfError(f"unsupported BTF kind {kind} for field {name}")

    def enum_values(self, name: str) -> dict[str, int]:
        type_id = self._find(name, _KIND_ENUM)
        header = self._type(type_id)
        vlen = header.info & 0xFFFF
        entries = (_BtfEnum * vlen).from_address(ctypes.addressof(header) + 12)
        return {self._name(e.name_off): e.val for e in entries}

    def variable_offset(self, section: str, variable: str) -> tuple[int, int]:
        """(offset, size) of a global variable inside a data section such as .rodata."""
        type_id = self._find(section, _KIND_DATASEC)
        header = self._type(type_id)
        vlen = header.info & 0xFFFF
        infos = (_BtfVarSecinfo * vlen).from_address(ctypes.addressof(header) + 12)
        for info in infos:
            var = self._type(info.type)
            if self._name(var.name_off) == variable:
                return info.index_type, info.nelems  # secinfo's offset and size
        raise BpfError(f"variable {variable!r} not in {section} of {self._path}")
