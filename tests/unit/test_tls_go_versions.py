"""Go 1.19 and 1.21 to 1.27, stripped and not (and position-independent): what golang.py
reads from REAL executables (tlspeer.go built by each toolchain, cached under
build/go-peers), checked against what other readers say about the same files: the ELF
symbol table (pyelftools), GNU objdump's disassembly, and the DWARF of the build with
symbols."""

from __future__ import annotations

import functools
import logging
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from runtimes import GoPeer, build_go_peer

from flowtap.tls import golang
from flowtap.tls.attach import inspect_file
from flowtap.tls.elf import ElfImage, Function
from flowtap.tls.golang import GoPlacement, plan_go
from flowtap.tls.goruntime import GoRuntimeError

RELEASES = ["1.19", "1.21", "1.22", "1.23", "1.24", "1.25", "1.26", "1.27"]
FLAVORS = ["symbols", "stripped"]
FUNCTIONS = list(golang._ENTRY_PROGRAMS)
OBJDUMP = shutil.which("objdump") or "/usr/bin/objdump"
# The walk's fields, by the DWARF names of their structs.
WALK_FIELDS = {
    "crypto/tls.Conn": "conn",
    "net.TCPConn": "conn",
    "net.conn": "fd",
    "net.netFD": "pfd",
    "internal/poll.FD": "Sysfd",
}
_RET = re.compile(r"^\s*([0-9a-f]+):\s+ret\b", re.MULTILINE)


@functools.cache
def peer(minor: str, flavor: str) -> GoPeer:
    built = build_go_peer(minor, flavor)
    if built is None:
        pytest.skip(f"no Go {minor} toolchain (make runtimes)")
    return built


@functools.cache
def placement(minor: str, flavor: str) -> GoPlacement:
    with ElfImage(peer(minor, flavor).path) as image:
        found = plan_go(image)
    assert found is not None
    return found


@functools.cache
def symbol_functions(minor: str) -> dict[str, Function]:
    with ElfImage(peer(minor, "symbols").path) as image:
        return image.functions(set(FUNCTIONS))


def objdump_rets(path: Path, start: int, size: int) -> list[int]:
    """Addresses of every RET GNU objdump finds in [start, start + size)."""
    shown = subprocess.run(
        [OBJDUMP, "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
         f"--stop-address={start + size:#x}", str(path)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return [int(address, 16) for address in _RET.findall(shown)]


@functools.cache
def dwarf_offsets(minor: str) -> tuple[int, int, int]:
    """The walk's offsets from DWARF (Go writes every type into the runtime unit)."""
    with peer(minor, "symbols").path.open("rb") as stream:
        dwarf = ELFFile(stream).get_dwarf_info()
        found: dict[str, int] = {}
        for unit in dwarf.iter_CUs():
            if unit.get_top_DIE().attributes["DW_AT_name"].value != b"runtime":
                continue
            for die in unit.get_top_DIE().iter_children():
                attribute = die.attributes.get("DW_AT_name")
                name = attribute.value.decode() if attribute else ""
                wanted = WALK_FIELDS.get(name)
                if die.tag != "DW_TAG_structure_type" or not wanted:
                    continue
                for member in die.iter_children():
                    if member.attributes["DW_AT_name"].value.decode() == wanted:
                        found[name] = member.attributes["DW_AT_data_member_location"].value
    assert len(found) == len(WALK_FIELDS), found
    return (
        found["crypto/tls.Conn"],
        found["net.TCPConn"] + found["net.conn"],
        found["net.netFD"] + found["internal/poll.FD"],
    )


def section_of(path: Path, address: int) -> tuple[str, int]:
    with path.open("rb") as stream:
        for section in ELFFile(stream).iter_sections():
            start, size = section["sh_addr"], section["sh_size"]
            if section["sh_flags"] & 2 and start <= address < start + size:
                return section.name, start
    raise AssertionError(f"{address:#x} in no section of {path}")


@pytest.mark.parametrize("minor", RELEASES)
def test_pclntab_agrees_with_the_symbol_table(minor: str) -> None:
    """Read from the build with symbols both ways: same entry addresses (Go 1.27 counts
    from the module's text: its pcHeader's textStart is 0)."""
    expected = symbol_functions(minor)
    with ElfImage(peer(minor, "symbols").path) as image:
        text = image.section_span(".text")
        assert text is not None
        read = golang._pclntab_functions(image, set(FUNCTIONS), text[0])
    assert set(read) == set(FUNCTIONS) == set(expected)
    for name, function in read.items():
        assert function.address == expected[name].address
        # pclntab's size runs to the next function (alignment padding included).
        assert expected[name].size <= function.size < expected[name].size + 64


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("minor", RELEASES)
def test_probe_sites(minor: str, flavor: str) -> None:
    """Every function found in the runtime's table; every RET that
    GNU objdump sees is probed and nothing else; the entry probe at the function's first
    instruction or its stack check's jump; the same code shape as the build with symbols."""
    path = peer(minor, flavor).path
    found = placement(minor, flavor)
    assert found.version.startswith(f"go{minor}.")
    assert found.source == "pclntab"
    assert [name for name, _, _ in found.functions] == FUNCTIONS
    with ElfImage(path) as image:
        text = image.section_span(".text")
        assert text is not None
        functions = golang._pclntab_functions(image, set(FUNCTIONS), text[0])
        reference = placement(minor, "symbols")
        for (name, entry, rets), (_, ref_entry, ref_rets) in zip(
            found.functions, reference.functions, strict=True
        ):
            function = functions[name]
            start = image.file_offset(function.address)
            assert [image.file_offset(a) for a in objdump_rets(path, *_span(function))] == list(
                rets
            )
            assert entry == start or 0 < entry - start <= 16
            # Stripping moves data, not the shape of the code.
            ref_start = image_offset(minor, name)
            assert [r - start for r in rets] == [r - ref_start for r in ref_rets]
            assert entry - start == ref_entry - ref_start


def _span(function: Function) -> tuple[int, int]:
    return function.address, function.size


def image_offset(minor: str, name: str) -> int:
    with ElfImage(peer(minor, "symbols").path) as image:
        return image.file_offset(symbol_functions(minor)[name].address)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("minor", RELEASES)
def test_conn_walk(minor: str, flavor: str) -> None:
    """The walk's offsets are DWARF's; its itab is the symbol table's where the linker names
    it (to Go 1.26), and at the same place in its section in the stripped build."""
    found = placement(minor, flavor)
    walk = found.walk
    assert walk is not None, found.walk_note
    assert found.walk_note == "itab and offsets from the type descriptors"
    assert (walk.conn_offset, walk.fd_offset, walk.sysfd_offset) == dwarf_offsets(minor)
    symbols_path = peer(minor, "symbols").path
    with ElfImage(symbols_path) as image:
        named = image.functions(set(golang._TCPCONN_ITABS), kinds=("STT_OBJECT",))
    reference = placement(minor, "symbols").walk
    assert reference is not None
    if named:
        assert reference.itab_tcpconn == next(iter(named.values())).address
    section, start = section_of(symbols_path, reference.itab_tcpconn)
    here, here_start = section_of(peer(minor, flavor).path, walk.itab_tcpconn)
    assert (here, walk.itab_tcpconn - here_start) == (section, reference.itab_tcpconn - start)


def test_table_when_the_descriptors_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The itab from the symbol table, the offsets from the table's row."""

    def unreadable(*_args: object) -> None:
        raise GoRuntimeError("made unreadable")

    monkeypatch.setattr(golang, "GoRuntime", unreadable)
    with ElfImage(peer("1.21", "symbols").path) as image:
        found = plan_go(image)
    assert found is not None and found.walk is not None
    assert found.walk_note.startswith("offsets from the table")
    assert (found.walk.conn_offset, found.walk.fd_offset, found.walk.sysfd_offset) == (0, 0, 16)
    assert golang.table_offsets((1, 40)) == golang.table_offsets((1, 27)) == (0, 0, 16)


def test_unprobed_go_executable_is_logged_with_its_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stripped Go 1.27 executable whose function table is damaged: not probed, and the
    log says which Go and why."""
    copy = tmp_path / "damaged"
    damage_pclntab(peer("1.27", "stripped").path, copy)
    with caplog.at_level(logging.WARNING, logger="flowtap.tls"):
        assert inspect_file(copy, str(copy)) is None
    assert "Go TLS not probed: go1.27.3: .gopclntab format 0x12345678 is not read" in caplog.text


def damage_pclntab(source: Path, copy: Path) -> None:
    shutil.copyfile(source, copy)
    with ElfImage(copy) as image:
        span = image.section_span(".gopclntab")
        assert span is not None
        offset = image.file_offset(span[0])
    with copy.open("r+b") as stream:
        stream.seek(offset)
        stream.write(struct.pack("<I", 0x12345678))


def test_symbols_when_the_function_table_is_not_read(tmp_path: Path) -> None:
    copy = tmp_path / "damaged"
    damage_pclntab(peer("1.25", "symbols").path, copy)
    with ElfImage(copy) as image:
        found = plan_go(image)
    assert found is not None
    assert found.source == "symbols"
    assert found.functions == placement("1.25", "symbols").functions


def test_go_1_16_function_table_format() -> None:
    """Go 1.17 writes the Go 1.16 format: 8-byte absolute entries, no textStart (no Go 1.17
    toolchain here: bytes laid out as runtime/symtab.go of Go 1.17 reads them)."""
    names = b"\0main.main\0crypto/tls.(*Conn).Read\0"
    funcname_off, pcln_off = 0x40, 0x40 + len(names)  # after the 64-byte header
    entries = [(0x401000, 0x30), (0x401200, 0x40), (0x401300, 0x50)]  # the last ends the table
    ftab = b"".join(struct.pack("<QQ", *pair) for pair in entries)
    funcs = ftab.ljust(0x30, b"\0")
    funcs += struct.pack("<Qi", 0x401000, 1).ljust(0x10, b"\0")
    funcs += struct.pack("<Qi", 0x401200, 11).ljust(0x10, b"\0")
    header = struct.pack("<IBBBB", 0xFFFFFFFA, 0, 0, 1, 8)
    header += struct.pack("<7Q", 2, 0, funcname_off, 0, 0, 0, pcln_off)
    tab = header + names + funcs
    found = golang._function_table(
        tab, {"crypto/tls.(*Conn).Read"}, nfunc=2, funcname_off=funcname_off,
        pcln_off=pcln_off, text_start=0, wide=True,
    )  # fmt: skip
    assert found == {
        "crypto/tls.(*Conn).Read": Function("crypto/tls.(*Conn).Read", 0x401200, 0x100)
    }


@pytest.mark.parametrize("minor", ["1.21", "1.27"])
def test_position_independent(minor: str) -> None:
    """-buildmode=pie: the functions from the runtime's table (among the relocated data
    before Go 1.27) match the symbol table; no walk (its addresses are final only once
    loaded)."""
    path = peer(minor, "pie").path
    with ElfImage(path) as image:
        found = plan_go(image)
        expected = image.functions(set(FUNCTIONS))
        text = image.section_span(".text")
        assert text is not None
        read = golang._pclntab_functions(image, set(FUNCTIONS), text[0])
    assert {name: f.address for name, f in read.items()} == {
        name: f.address for name, f in expected.items()
    }
    assert found is not None
    assert found.source == "pclntab"
    assert found.walk is None
    assert found.walk_note == "position-independent executable"


def test_build_info_found_without_its_section_name(tmp_path: Path) -> None:
    """Section names renamed (as a packer or a stripping tool may leave them): the build
    info is still found by its magic, and the version read."""
    copy = tmp_path / "renamed"
    data = peer("1.27", "stripped").path.read_bytes()
    assert data.count(b".go.buildinfo\0") == 1
    copy.write_bytes(data.replace(b".go.buildinfo\0", b".go.xuildinfo\0"))
    with ElfImage(copy) as image:
        assert image.section(".go.buildinfo") is None
        assert golang.go_version(image) == "go1.27.3"
