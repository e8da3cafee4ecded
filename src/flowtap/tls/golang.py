"""Go executables: crypto/tls in the binary itself, probed at (*Conn).Read and Write (and
at the handshakes, for their socket).

The Go version comes from the build info (.go.buildinfo, written inline since Go 1.18).
The functions come from the symbol table or, in stripped executables (-ldflags=-s), from
the runtime's own function table (.gopclntab), which every Go executable keeps. Each
function gets an entry probe and a plain uprobe at every RET found by disassembling it:
never a uretprobe, because Go moves goroutine stacks and a hijacked return address would
crash the program.

Only the register ABI on amd64 is probed, from Go 1.18 (whose build info says the
version); other executables are reported and left alone (their connections are still
reported, without plaintext). See docs/tls.md.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import capstone  # type: ignore[import-untyped]

from flowtap.tls.elf import ElfImage, ElfReadError, Function
from flowtap.tls.placement import ProbeSite

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
SIGNATURE = WRITE_FUNCTION.encode()

_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_VERSION = re.compile(r"go(\d+)\.(\d+)")
_PCLNTAB_GO118 = (0xFFFFFFF0, 0xFFFFFFF1)  # Go 1.18-1.19, Go 1.20 and later
_MAX_FUNCTION_BYTES = 64 << 10
# Large Go programs have about 100,000 functions; a table claiming far more is hostile
# and would keep the discovery worker busy for seconds.
_MAX_FUNCTIONS = 1 << 20


class UnsupportedGoError(Exception):
    """A Go executable this sensor cannot probe; the message says why."""


# The itab of *net.TCPConn as a net.Conn: its symbol before and since Go 1.20.
_TCPCONN_ITABS = ("go.itab.*net.TCPConn,net.Conn", "go:itab.*net.TCPConn,net.Conn")
# Field offsets from a *tls.Conn to its socket's fd, unchanged from Go 1.17 to 1.23 (read
# off the sources: tls.Conn.conn is its first field, net.conn.fd the first of TCPConn,
# netFD.pfd the first of netFD, and poll.FD.Sysfd follows its 16-byte fdMutex).
_WALK_OFFSETS: dict[tuple[int, int], tuple[int, int, int]] = {
    (1, minor): (0, 0, 16) for minor in range(17, 24)
}


@dataclass(frozen=True, slots=True)
class GoConnWalk:
    """From a *tls.Conn to its fd: see go_conn_socket in bpf/conn.bpf.c."""

    itab_tcpconn: int
    conn_offset: int
    fd_offset: int
    sysfd_offset: int


@dataclass(frozen=True, slots=True)
class GoPlacement:
    version: str
    functions: tuple[tuple[str, int, tuple[int, ...]], ...]  # name, entry offset, RET offsets
    source: str  # where the functions were found: "symbols" or "pclntab"
    walk: GoConnWalk | None = None  # None: the socket is only seen through syscalls
    walk_note: str = ""

    kind = "go"

    def describe(self) -> str:
        parts = ", ".join(f"{name} (+{len(rets)} RET)" for name, _, rets in self.functions)
        walk = "tls.Conn walked to its fd" if self.walk else f"no tls.Conn walk: {self.walk_note}"
        return f"{self.version}, {parts}, from {self.source}; {walk}"

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
    """The executable's Go version; None when it is not a Go executable."""
    blob = image.section(".go.buildinfo")
    if blob is None:
        return None
    return build_version(blob)


def _pclntab_functions(image: ElfImage, wanted: set[str]) -> dict[str, Function]:
    """The wanted functions from .gopclntab (Go 1.18 and later)."""
    tab = image.section(".gopclntab")
    if tab is None or len(tab) < 8 + 8 * 8:
        raise UnsupportedGoError("stripped, and no .gopclntab to find functions in")
    magic = struct.unpack_from("<I", tab, 0)[0]
    if magic not in _PCLNTAB_GO118 or tab[7] != 8:
        raise UnsupportedGoError(f"stripped, and .gopclntab format {magic:#x} is not read")
    nfunc, _nfiles, text_start, funcname_off, _cu, _file, _pc, pcln_off = struct.unpack_from(
        "<8Q", tab, 8
    )
    found: dict[str, Function] = {}
    table = pcln_off
    if nfunc > _MAX_FUNCTIONS or table + (nfunc + 1) * 8 > len(tab):
        raise ElfReadError(".gopclntab function table is cut short")
    for index in range(nfunc):
        entry_off, func_off = struct.unpack_from("<II", tab, table + index * 8)
        name_off = struct.unpack_from("<i", tab, pcln_off + func_off + 4)[0]
        start = funcname_off + name_off
        end = tab.find(b"\0", start, start + 256)
        if end < 0:
            continue
        name = tab[start:end].decode("utf-8", "replace")
        if name in wanted:
            next_off = struct.unpack_from("<I", tab, table + (index + 1) * 8)[0]
            found[name] = Function(name, text_start + entry_off, next_off - entry_off)
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
    """Probes for a Go executable; None when it is not Go. UnsupportedGoError says why a
    Go executable cannot be probed."""
    version = go_version(image)
    if version is None:
        return None
    parsed = parse_version(version)
    if parsed is None or parsed < MIN_VERSION:
        raise UnsupportedGoError(f"{version}: not supported (stack ABI), connection-level only")
    if image.machine != "EM_X86_64":
        raise UnsupportedGoError(f"{version} on {image.machine}: only amd64 is probed")
    wanted = set(_ENTRY_PROGRAMS)
    functions = image.functions(wanted)
    source = "symbols"
    if READ_FUNCTION not in functions or WRITE_FUNCTION not in functions:
        functions = _pclntab_functions(image, wanted)
        source = "pclntab"
    if READ_FUNCTION not in functions or WRITE_FUNCTION not in functions:
        raise UnsupportedGoError(f"{version}: crypto/tls is not linked in")
    walk, note = _conn_walk(image, parsed)
    probed = []
    for name in (READ_FUNCTION, WRITE_FUNCTION, CLIENT_HANDSHAKE, SERVER_HANDSHAKE):
        if name not in functions:
            continue
        insns = _disassemble(image, functions[name])
        entry = _entry(functions[name], insns)
        rets = tuple(image.file_offset(ret) for ret in _returns(functions[name], insns))
        probed.append((name, image.file_offset(entry), rets))
    return GoPlacement(version, tuple(probed), source, walk, note)


def _conn_walk(image: ElfImage, version: tuple[int, int]) -> tuple[GoConnWalk | None, str]:
    """How the kernel may walk a *tls.Conn to its fd here, or why it may not."""
    offsets = _WALK_OFFSETS.get(version)
    if offsets is None:
        return None, f"no field offsets known for go{version[0]}.{version[1]}"
    if image.position_independent:
        return None, "position-independent executable"
    itabs = image.functions(set(_TCPCONN_ITABS), kinds=("STT_OBJECT",))
    if not itabs:
        return None, "no symbol for the *net.TCPConn itab (stripped)"
    itab = next(iter(itabs.values())).address
    return GoConnWalk(itab, *offsets), ""
