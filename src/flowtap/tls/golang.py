"""Go executables: crypto/tls in the binary itself, probed at (*Conn).Read and Write (and
at the handshakes, for their socket).

Everything comes from the executable itself, stripped or not: the Go version from its
build info ("\\xff Go buildinf:", the version inline since Go 1.18, behind a pointer in
1.17); the functions from the symbol table or else the runtime's own function table
(.gopclntab, which every Go executable keeps); the tls.Conn walk's itab address and field
offsets from the runtime's itabs and type descriptors (goruntime.py), with a table per
release, its newest row for releases after it, where they cannot be read. Each function
gets an entry probe and a plain uprobe at every RET found by disassembling it: never a
uretprobe, because Go moves goroutine stacks and a hijacked return address would crash
the program.

Only the register ABI on amd64 is probed (Go 1.17 and later); other Go executables are
logged with their version and the reason, and left alone (their connections are still
reported, without plaintext). See docs/tls.md.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import capstone  # type: ignore[import-untyped]

from flowtap.tls.elf import ElfImage, ElfReadError, Function
from flowtap.tls.goruntime import KIND_INTERFACE, GoRuntime, GoRuntimeError
from flowtap.tls.placement import ProbeSite

log = logging.getLogger("flowtap.tls")

READ_FUNCTION = "crypto/tls.(*Conn).Read"
WRITE_FUNCTION = "crypto/tls.(*Conn).Write"
# The handshakes' sockets are their tls.Conn's. These two run once per connection, where
# handshakeContext is called by every Read and Write.
CLIENT_HANDSHAKE = "crypto/tls.(*Conn).clientHandshake"
SERVER_HANDSHAKE = "crypto/tls.(*Conn).serverHandshake"
_ENTRY_PROGRAMS = {
    READ_FUNCTION: "go_read_enter",
    WRITE_FUNCTION: "go_write_enter",
    CLIENT_HANDSHAKE: "go_handshake_enter",
    SERVER_HANDSHAKE: "go_handshake_enter",
}
_RETURN_PROGRAMS = {
    READ_FUNCTION: "go_return",
    WRITE_FUNCTION: "go_return",
    CLIENT_HANDSHAKE: "go_handshake_return",
    SERVER_HANDSHAKE: "go_handshake_return",
}
# What the entry probe reads: receiver, slice pointer and length, and the goroutine.
_ENTRY_REGISTERS = frozenset({"rax", "eax", "rbx", "ebx", "rcx", "ecx", "r14"})
MIN_VERSION = (1, 17)  # the register ABI on amd64

_BUILDINFO_MAGIC = b"\xff Go buildinf:"
# Every Go executable has it: each one is looked at, so that one that is not probed is
# logged with its version and the reason.
SIGNATURE = _BUILDINFO_MAGIC
_VERSION = re.compile(r"go(\d+)\.(\d+)")
_PCLNTAB_GO116 = 0xFFFFFFFA  # Go 1.16-1.17: absolute entries, no textStart
_PCLNTAB_GO118 = (0xFFFFFFF0, 0xFFFFFFF1)  # Go 1.18-1.19, Go 1.20 and later
_MAX_FUNCTION_BYTES = 64 << 10
_MAX_VERSION_BYTES = 128
# Large Go programs have about 100,000 functions; a table claiming far more is hostile
# and would keep the discovery worker busy for seconds.
_MAX_FUNCTIONS = 1 << 20


class UnsupportedGoError(Exception):
    """A Go executable this sensor cannot probe; the message says why."""


# The itab of *net.TCPConn as a net.Conn: its symbol before and since Go 1.20 (Go 1.27's
# linker writes no itab symbols; the runtime's itab list finds it in every release).
_TCPCONN_ITABS = ("go.itab.*net.TCPConn,net.Conn", "go:itab.*net.TCPConn,net.Conn")
# Field offsets from a *tls.Conn to its socket's fd, for when the type descriptors cannot
# be read: (tls.Conn.conn, net.TCPConn.conn.fd, netFD.pfd.Sysfd). Read off the sources and
# checked against DWARF of real builds (tests/unit/test_tls_go_versions.py):
# unchanged from Go 1.17 to 1.27. A later release takes the newest row.
_WALK_OFFSETS: dict[tuple[int, int], tuple[int, int, int]] = {
    (1, minor): (0, 0, 16) for minor in range(17, 28)
}


@dataclass(frozen=True, slots=True)
class GoConnWalk:
    """From a *tls.Conn to its fd: see go_conn_socket in bpf/sensor/gotls.bpf.c."""

    itab_tcpconn: int
    conn_offset: int
    fd_offset: int
    sysfd_offset: int


@dataclass(frozen=True, slots=True)
class GoPlacement:
    version: str
    functions: tuple[tuple[str, int, tuple[int, ...]], ...]  # name, entry offset, RET offsets
    source: str  # where the functions were found: "pclntab" or "symbols"
    walk: GoConnWalk | None = None  # None: the socket is only seen through syscalls
    walk_note: str = ""  # where the walk's itab and offsets came from, or why there is none

    kind = "go"

    def describe(self) -> str:
        parts = ", ".join(f"{name} (+{len(rets)} RET)" for name, _, rets in self.functions)
        walk = "tls.Conn walked to its fd" if self.walk else "no tls.Conn walk"
        return f"{self.version}, {parts}, from {self.source}; {walk}: {self.walk_note}"

    def sites(self) -> list[ProbeSite]:
        return [
            site
            for name, entry, rets in self.functions
            for site in (
                ProbeSite(_ENTRY_PROGRAMS[name], entry),
                *(ProbeSite(_RETURN_PROGRAMS[name], ret) for ret in rets),
            )
        ]


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of "go1.21.3", "go1.22rc1", "devel go1.23-abc"; None otherwise."""
    match = _VERSION.search(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if pos >= len(data):
            break
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ElfReadError("bad varint in the Go build info")


def build_version(blob: bytes) -> str:
    """The Go version in a .go.buildinfo section (Go 1.18+ inline strings)."""
    if not blob.startswith(_BUILDINFO_MAGIC) or len(blob) < 32:
        raise ElfReadError("no Go build info")
    flags = blob[15]
    if not flags & 0x2:
        raise UnsupportedGoError("build info from before Go 1.18 (version not inline)")
    length, pos = _uvarint(blob, 32)
    version = blob[pos : pos + length]
    if len(version) != length or not version.isascii():
        raise ElfReadError("truncated Go build info")
    return version.decode()


def go_version(image: ElfImage) -> str | None:
    """The executable's Go version; None when it is not a Go executable. The build info is
    the .go.buildinfo section, or found by its magic when section headers say nothing."""
    blob = image.section(".go.buildinfo")
    if blob is None or not blob.startswith(_BUILDINFO_MAGIC):
        # The linker aligns it to 16 bytes; the same bytes elsewhere are a string constant
        # (in Go's own debug/buildinfo, say).
        found = [at for at in image.find(_BUILDINFO_MAGIC, limit=8) if at % 16 == 0]
        if not found:
            return None
        blob = image.read_file(found[0], 64 + _MAX_VERSION_BYTES)
    if len(blob) >= 32 and not blob[15] & 0x2:
        return pointed_version(blob, image.read)
    return build_version(blob)


def pointed_version(blob: bytes, read: Callable[[int, int], bytes]) -> str:
    """Go 1.17 and before: the build info points at runtime.buildVersion, a Go string
    (read(address, length) reads the executable's memory image)."""
    if blob[14] != 8 or blob[15] & 0x1:
        raise UnsupportedGoError("build info of a 32-bit or big-endian executable")
    pointer, length = struct.unpack("<2Q", read(struct.unpack_from("<Q", blob, 16)[0], 16))
    if length > _MAX_VERSION_BYTES:
        raise ElfReadError("Go version string too long")
    version = read(pointer, length)
    if not version.isascii():
        raise ElfReadError("Go version string is not text")
    return version.decode()


def _pclntab_functions(
    image: ElfImage, wanted: set[str], text_start: int | None
) -> dict[str, Function]:
    """The wanted functions from .gopclntab (the Go 1.16 format and Go 1.18's). Since Go
    1.26 the header's textStart is 0: entries count from the module's text then."""
    # Position-independent builds before Go 1.27 put it among the relocated data.
    tab = image.section(".gopclntab") or image.section(".data.rel.ro.gopclntab")
    if tab is None or len(tab) < 8 + 8 * 8:
        raise UnsupportedGoError("no .gopclntab to find functions in")
    magic = struct.unpack_from("<I", tab, 0)[0]
    if tab[7] != 8 or (magic not in _PCLNTAB_GO118 and magic != _PCLNTAB_GO116):
        raise UnsupportedGoError(f".gopclntab format {magic:#x} is not read")
    wide = magic == _PCLNTAB_GO116
    if wide:  # Go 1.16-1.17: absolute entries, no textStart field
        nfunc, _nfiles, funcname_off, _cu, _file, _pc, pcln_off = struct.unpack_from("<7Q", tab, 8)
        start: int | None = 0
    else:
        nfunc, _nfiles, header, funcname_off, _cu, _file, _pc, pcln_off = struct.unpack_from(
            "<8Q", tab, 8
        )
        start = header or text_start
    if start is None:
        raise UnsupportedGoError("where .gopclntab counts from is unknown")
    return _function_table(
        tab,
        wanted,
        nfunc=nfunc,
        funcname_off=funcname_off,
        pcln_off=pcln_off,
        text_start=start,
        wide=wide,
    )


def _function_table(
    tab: bytes,
    wanted: set[str],
    *,
    nfunc: int,
    funcname_off: int,
    pcln_off: int,
    text_start: int,
    wide: bool,
) -> dict[str, Function]:
    """Walks the function table: (entry, func offset) pairs, 8-byte absolute addresses in
    the Go 1.16 format (wide), 4-byte offsets from text_start since Go 1.18; each _func
    starts with its entry, then its name's offset in funcnametab."""
    pair, entry_size = ("<QQ", 8) if wide else ("<II", 4)
    step = 2 * entry_size
    if nfunc > _MAX_FUNCTIONS or pcln_off + (nfunc + 1) * step > len(tab):
        raise ElfReadError(".gopclntab function table is cut short")
    found: dict[str, Function] = {}
    for index in range(nfunc):
        entry, func_off = struct.unpack_from(pair, tab, pcln_off + index * step)
        name_at = pcln_off + func_off + entry_size
        if name_at + 4 > len(tab):
            raise ElfReadError(".gopclntab function entry is cut short")
        start = funcname_off + struct.unpack_from("<i", tab, name_at)[0]
        end = tab.find(b"\0", start, start + 256)
        if end < 0 or tab[start:end].decode("utf-8", "replace") not in wanted:
            continue
        name = tab[start:end].decode()
        following = struct.unpack_from(pair, tab, pcln_off + (index + 1) * step)[0]
        found[name] = Function(name, text_start + entry, following - entry)
        if len(found) == len(wanted):
            break
    return found


def _disassemble(image: ElfImage, function: Function) -> list[capstone.CsInsn]:
    size = min(function.size, _MAX_FUNCTION_BYTES)
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = True
    return list(cs.disasm(image.code(function.address, size), function.address))


def _returns(function: Function, insns: list[capstone.CsInsn]) -> list[int]:
    rets = [insn.address for insn in insns if insn.mnemonic == "ret"]
    if not rets:
        raise UnsupportedGoError(f"{function.name}: no RET found")
    return rets


def _entry(function: Function, insns: list[capstone.CsInsn]) -> int:
    """Where the entry probe goes: the stack check's conditional jump, which the kernel
    emulates, when what runs before it (a cmp, an lea into R12) leaves the registers the
    probe reads alone; else the first instruction, which it single-steps. When the stack
    must grow, the function starts over and the probe fires again: harmless."""
    for insn in insns[:4]:
        if insn.group(capstone.CS_GRP_JUMP):
            return int(insn.address) if insn.mnemonic != "jmp" else function.address
        _read, written = insn.regs_access()
        if any(insn.reg_name(reg) in _ENTRY_REGISTERS for reg in written):
            break
    return function.address


def plan_go(image: ElfImage) -> GoPlacement | None:
    """Probes for a Go executable; None when it is not Go, or has no crypto/tls (logged).
    UnsupportedGoError says, with the version, why a Go executable cannot be probed."""
    version = go_version(image)
    if version is None:
        return None
    try:
        return _plan_version(image, version)
    except (ElfReadError, UnsupportedGoError) as exc:
        text = str(exc)
        text = text if text.startswith(version) else f"{version}: {text}"
        raise UnsupportedGoError(text) from exc


def _plan_version(image: ElfImage, version: str) -> GoPlacement | None:
    parsed = parse_version(version)
    if parsed is None or parsed < MIN_VERSION:
        raise UnsupportedGoError(f"{version}: not supported (stack ABI), connection-level only")
    if image.machine != "EM_X86_64":
        raise UnsupportedGoError(f"{version} on {image.machine}: only amd64 is probed")
    runtime, runtime_note = _runtime(image, parsed)
    functions, source = _find_functions(image, runtime)
    if READ_FUNCTION not in functions or WRITE_FUNCTION not in functions:
        log.info("%s: %s: no crypto/tls linked in, nothing to probe", image.path, version)
        return None
    walk, note = _conn_walk(image, parsed, runtime, runtime_note)
    probed = []
    for name in (READ_FUNCTION, WRITE_FUNCTION, CLIENT_HANDSHAKE, SERVER_HANDSHAKE):
        if name not in functions:
            continue
        insns = _disassemble(image, functions[name])
        entry = _entry(functions[name], insns)
        rets = tuple(image.file_offset(ret) for ret in _returns(functions[name], insns))
        probed.append((name, image.file_offset(entry), rets))
    return GoPlacement(version, tuple(probed), source, walk, note)


def _find_functions(image: ElfImage, runtime: GoRuntime | None) -> tuple[dict[str, Function], str]:
    """The probed functions and where they were found. The runtime's own table first: every
    Go executable has it, and it is read ~5x faster than pyelftools walks a symbol table of
    10,000 entries; the symbol table when the table is in a format not read here."""
    wanted = set(_ENTRY_PROGRAMS)
    text = runtime.module.text if runtime else _section_start(image, ".text")
    try:
        return _pclntab_functions(image, wanted, text), "pclntab"
    except (UnsupportedGoError, ElfReadError) as exc:
        functions = image.functions(wanted)
        if READ_FUNCTION in functions and WRITE_FUNCTION in functions:
            return functions, "symbols"
        raise exc from None


def _section_start(image: ElfImage, name: str) -> int | None:
    span = image.section_span(name)
    return None if span is None else span[0]


def _runtime(image: ElfImage, version: tuple[int, int]) -> tuple[GoRuntime | None, str]:
    """The runtime's own tables, or why they cannot be read (the addresses in a
    position-independent executable's data are only final once it is loaded)."""
    if image.position_independent:
        return None, "position-independent executable"
    try:
        return GoRuntime(image, version), ""
    except (GoRuntimeError, ElfReadError) as exc:
        return None, f"runtime tables not read ({exc})"


def table_offsets(version: tuple[int, int]) -> tuple[int, int, int]:
    """The walk's offsets from the table: this release's row, else the newest one."""
    return _WALK_OFFSETS.get(version) or _WALK_OFFSETS[max(_WALK_OFFSETS)]


def _conn_walk(
    image: ElfImage, version: tuple[int, int], runtime: GoRuntime | None, runtime_note: str
) -> tuple[GoConnWalk | None, str]:
    """How the kernel may walk a *tls.Conn to its fd here, or why it may not. The itab's
    address is never guessed: from the runtime's itab list, else the symbol table."""
    if image.position_independent:
        return None, "position-independent executable"
    itab = None
    if runtime is not None:
        try:
            itab = runtime.itab("*net.TCPConn", "net.Conn")
        except GoRuntimeError as exc:
            runtime, runtime_note = None, f"runtime tables not read ({exc})"
    if itab is None:
        symbols = image.functions(set(_TCPCONN_ITABS), kinds=("STT_OBJECT",))
        if not symbols:
            reason = runtime_note or "the linker made no *net.TCPConn itab"
            return None, f"no *net.TCPConn itab found: {reason}"
        itab = next(iter(symbols.values())).address
    try:
        if runtime is None:
            raise GoRuntimeError(runtime_note)
        offsets = derived_offsets(runtime, itab)
        note = "itab and offsets from the type descriptors"
    except (GoRuntimeError, ElfReadError) as exc:
        offsets = table_offsets(version)
        note = f"offsets from the table ({exc})"
    return GoConnWalk(itab, *offsets), note


def derived_offsets(runtime: GoRuntime, tcpconn_itab: int) -> tuple[int, int, int]:
    """(tls.Conn.conn, TCPConn -> netFD pointer, netFD -> Sysfd) from the descriptors."""
    tcpconn = runtime.elem(runtime.itab_type(tcpconn_itab))
    conn, conn_type = runtime.field(tcpconn, "conn")
    fd, fd_type = runtime.field(conn_type, "fd")
    pfd, pfd_type = runtime.field(runtime.elem(fd_type), "pfd")
    sysfd, _ = runtime.field(pfd_type, "Sysfd")
    tls_itab = runtime.itab("*tls.Conn", "net.Conn")
    if tls_itab is None:
        raise GoRuntimeError("no *tls.Conn itab")
    tls_conn, tls_conn_type = runtime.field(runtime.elem(runtime.itab_type(tls_itab)), "conn")
    if runtime.kind(tls_conn_type) != KIND_INTERFACE:
        raise GoRuntimeError("tls.Conn.conn is not an interface")
    return tls_conn, conn + fd, pfd + sysfd
