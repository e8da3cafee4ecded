"""Where to put the OpenSSL probes in one library or executable, read from its code.

A uprobe on an instruction the kernel emulates (push, call, jmp, nop) costs ~0.5 us a
hit; on one it must single-step (sub, mov, endbr64) ~9 us (docs/hooks.md). Debian's
SSL_read/SSL_write and their _ex variants start with `sub $n,%rsp`, and each of them only
calls one internal function (ssl_read_internal/ssl_write_internal) that starts with
`push`. When the code shows exactly that shape, the probes go on the internal functions:
one entry and one return probe per direction, for both variants. Otherwise, or when
anything is unsure, they go on the exported functions' entries.

The internal function is only used when the _ex variant passes its own four arguments
(ssl, buf, num, out-length) through unchanged to it: then the entry probe reads them
from the same registers as at SSL_read_ex, and the return value means the same. A
uretprobe stays at a function's entry, where the return address is on top of the stack
(an endbr64 in front is skipped: it moves nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import capstone  # type: ignore[import-untyped]
from capstone import x86_const

from flowtap.tls.elf import ElfImage, ElfReadError

READ, WRITE = "read", "write"
EXPORTED: dict[str, tuple[str, str]] = {
    # function: (direction, BPF entry program)
    "SSL_read": (READ, "ssl_read_enter"),
    "SSL_read_ex": (READ, "ssl_read_ex_enter"),
    "SSL_write": (WRITE, "ssl_write_enter"),
    "SSL_write_ex": (WRITE, "ssl_write_ex_enter"),
}
_EX_ENTRY = {READ: "ssl_read_ex_enter", WRITE: "ssl_write_ex_enter"}
RETURN_PROGRAM = "ssl_return"
_PAIRS = {READ: ("SSL_read", "SSL_read_ex"), WRITE: ("SSL_write", "SSL_write_ex")}

# First instructions the x86 uprobe code emulates instead of single-stepping.
_EMULATED = frozenset({"push", "call", "jmp", "nop"})
# The System V argument registers of (ssl, buf, num, out), in every width.
_ARGUMENT_REGISTERS = frozenset(
    {
        *("rdi", "edi", "di", "dil"),
        *("rsi", "esi", "si", "sil"),
        *("rdx", "edx", "dx", "dl", "dh"),
        *("rcx", "ecx", "cx", "cl", "ch"),
    }
)
_SCAN_BYTES = 192  # the call comes within the first few instructions


class NotOpenSslError(Exception):
    """The file has no OpenSSL read/write functions."""


@dataclass(frozen=True, slots=True)
class ProbePoint:
    entry_program: str  # BPF program at the entry; the return probe is RETURN_PROGRAM
    label: str  # what is probed, for logs
    address: int
    offset: int  # in the file


@dataclass(frozen=True, slots=True)
class ProbeSite:
    """One uprobe to attach: a BPF program at a file offset."""

    program: str
    offset: int
    retprobe: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    kind: Literal["internal", "exported"]
    probes: tuple[ProbePoint, ...]
    note: str  # why this placement
    runtime: str = ""  # the program that carries this OpenSSL, e.g. "node v20.20.2"

    def describe(self) -> str:
        names = ", ".join(probe.label for probe in self.probes)
        runtime = f"{self.runtime}, " if self.runtime else ""
        return f"{runtime}{self.kind} ({names}): {self.note}"

    def sites(self) -> list[ProbeSite]:
        """An entry probe and a return probe (ssl_return) at each point."""
        return [
            site
            for probe in self.probes
            for site in (
                ProbeSite(probe.entry_program, probe.offset),
                ProbeSite(RETURN_PROGRAM, probe.offset, retprobe=True),
            )
        ]


def _disassembler() -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = True
    return cs


def _instructions(image: ElfImage, address: int) -> list[capstone.CsInsn]:
    return list(_disassembler().disasm(image.code(address, _SCAN_BYTES), address))


def _skip_endbr(insns: list[capstone.CsInsn]) -> capstone.CsInsn | None:
    """The first instruction that does something (endbr64 marks a branch target only)."""
    for insn in insns[:2]:
        if insn.mnemonic != "endbr64":
            return insn
    return None


def _is_branch(insn: capstone.CsInsn) -> bool:
    return any(
        insn.group(group)
        for group in (capstone.CS_GRP_JUMP, capstone.CS_GRP_RET, capstone.CS_GRP_IRET)
    )


def _first_call(
    insns: list[capstone.CsInsn], *, allow_conditional: bool
) -> tuple[int, list[capstone.CsInsn]] | None:
    """The target of the first direct call on the straight path, and what runs before it.
    None when the path leaves first: any branch, or only an unconditional one when
    allow_conditional (SSL_read's `num < 0` check jumps to its error path)."""
    for index, insn in enumerate(insns):
        if insn.group(capstone.CS_GRP_CALL):
            operand = insn.operands[0] if insn.operands else None
            if operand is None or operand.type != x86_const.X86_OP_IMM:
                return None
            return operand.imm, insns[:index]
        if _is_branch(insn) and not (allow_conditional and _is_conditional(insn)):
            return None
    return None


def _is_conditional(insn: capstone.CsInsn) -> bool:
    return insn.group(capstone.CS_GRP_JUMP) and insn.mnemonic not in ("jmp", "ljmp")


def _writes_arguments(insn: capstone.CsInsn) -> bool:
    _read, written = insn.regs_access()
    return any(insn.reg_name(reg) in _ARGUMENT_REGISTERS for reg in written)


def _internal_target(
    image: ElfImage, direction: str, exported: dict[str, int]
) -> tuple[int, str] | str:
    """(address to probe, label) of the internal function both variants call, or why not."""
    plain_name, ex_name = _PAIRS[direction]
    if plain_name not in exported or ex_name not in exported:
        return f"{plain_name} or {ex_name} missing"
    plain = _first_call(_instructions(image, exported[plain_name]), allow_conditional=True)
    ex = _first_call(_instructions(image, exported[ex_name]), allow_conditional=False)
    if plain is None or ex is None:
        return f"{plain_name}/{ex_name}: no direct call before a branch"
    target, before = ex
    if plain[0] != target:
        return f"{plain_name} and {ex_name} call different functions"
    if target in exported.values() or image.in_plt(target) or not image.is_executable_code(target):
        return f"{ex_name} calls {target:#x}, not an internal function"
    if any(_writes_arguments(insn) for insn in before):
        return f"{ex_name} changes its arguments before the call"
    first = _skip_endbr(_instructions(image, target))
    if first is None or first.mnemonic not in _EMULATED:
        found = first.mnemonic if first is not None else "nothing"
        return f"the function {ex_name} calls starts with {found}, which is single-stepped"
    return first.address, f"{target:#x} (called by {plain_name} and {ex_name})"


def _exported_entry(image: ElfImage, address: int) -> int:
    if image.machine != "EM_X86_64":
        return address
    first = _skip_endbr(_instructions(image, address))
    return first.address if first is not None else address


def plan(image: ElfImage, *, internal: bool = True) -> Placement:
    """The probes for this file. NotOpenSslError when it has no SSL_read/SSL_write.
    internal=False always takes the exported entries (--tls-placement exported)."""
    exported = {name: fn.address for name, fn in image.functions(set(EXPORTED)).items()}
    if not any(name in exported for name in _PAIRS[READ]) or not any(
        name in exported for name in _PAIRS[WRITE]
    ):
        raise NotOpenSslError(f"{image.path}: no SSL_read/SSL_write functions")
    note = "not x86-64: no disassembly" if internal else "exported entries asked for"
    if internal and image.machine == "EM_X86_64":
        found: dict[str, tuple[int, str] | str]
        try:
            found = {
                direction: _internal_target(image, direction, exported)
                for direction in (READ, WRITE)
            }
        except ElfReadError as exc:
            found = {READ: str(exc)}
        reasons = [target for target in found.values() if isinstance(target, str)]
        targets = [target for target in found.values() if not isinstance(target, str)]
        if not reasons and targets[0][0] != targets[1][0]:
            probes = tuple(
                ProbePoint(_EX_ENTRY[direction], label, address, image.file_offset(address))
                for direction, (address, label) in zip((READ, WRITE), targets, strict=True)
            )
            return Placement("internal", probes, "emulated first instruction")
        note = "; ".join(reasons) or "read and write call the same function"
    entries: list[ProbePoint] = []
    for name, address in sorted(exported.items()):
        at = _exported_entry(image, address)
        entries.append(ProbePoint(EXPORTED[name][1], name, at, image.file_offset(at)))
    return Placement("exported", tuple(entries), note)
