"""Probe placement read from code: tiny libraries assembled from known instruction shapes.

Each fixture library exports SSL_read, SSL_read_ex, SSL_write and SSL_write_ex shaped like
Debian's libssl (a `sub` first, then a call to an internal function) or deliberately not,
and the plan must say where the probes go, or fall back to the exported entries.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flowtap.tls.elf import ElfImage, ElfReadError, contains_any
from flowtap.tls.placement import NotOpenSslError, plan

ENTRY_PLAIN = """\
{name}:
    sub $0x18,%rsp
    test %edx,%edx
    js 1f
    mov %rsp,%rcx
    movslq %edx,%rdx
    call {target}
1:  add $0x18,%rsp
    ret
"""
ENTRY_EX = """\
{name}:
    sub $0x8,%rsp
{setup}    call {target}
    add $0x8,%rsp
    ret
"""
INTERNAL = """\
{name}:
{first}    xor %eax,%eax
    pop %rbx
    ret
"""


def assemble(tmp_path: Path, body: str, name: str = "libfake.so") -> Path:
    source = tmp_path / (name + ".s")
    exports = ["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex"]
    head = "".join(f".globl {e}\n.type {e},@function\n" for e in exports)
    source.write_text(".text\n" + head + body)
    out = tmp_path / name
    subprocess.run(
        ["gcc", "-shared", "-nostdlib", "-o", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def library(
    tmp_path: Path,
    *,
    first: str = "    push %rbx\n",
    write_ex_setup: str = "",
    read_target: str = "read_internal",
    write_target: str = "write_internal",
) -> Path:
    body = (
        ENTRY_PLAIN.format(name="SSL_read", target="read_internal")
        + ENTRY_EX.format(name="SSL_read_ex", setup="", target=read_target)
        + ENTRY_PLAIN.format(name="SSL_write", target="write_internal")
        + ENTRY_EX.format(name="SSL_write_ex", setup=write_ex_setup, target=write_target)
        + INTERNAL.format(name="read_internal", first=first)
        + INTERNAL.format(name="write_internal", first=first)
        + INTERNAL.format(name="other_internal", first=first)
    )
    return assemble(tmp_path, body)


def local_symbols(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in map(str.split, out.splitlines())}


def test_internal_functions_with_push_are_probed(tmp_path: Path) -> None:
    path = library(tmp_path)
    symbols = local_symbols(path)

    with ElfImage(path) as image:
        placement = plan(image)

    assert placement.kind == "internal"
    assert [(p.entry_program, p.address) for p in placement.probes] == [
        ("ssl_read_ex_enter", symbols["read_internal"]),
        ("ssl_write_ex_enter", symbols["write_internal"]),
    ]
    # A shared library's text is mapped at the file offset it has in the file.
    assert [p.offset for p in placement.probes] == [p.address for p in placement.probes]


def test_endbr64_in_front_is_skipped(tmp_path: Path) -> None:
    path = library(tmp_path, first="    endbr64\n    push %rbx\n")
    symbols = local_symbols(path)

    with ElfImage(path) as image:
        placement = plan(image)

    assert placement.kind == "internal"
    assert placement.probes[0].address == symbols["read_internal"] + 4


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ({"first": "    sub $0x8,%rsp\n    push %rbx\n"}, "starts with sub, which is single-"),
        (
            {"write_ex_setup": "    mov %rcx,%r8\n    xor %ecx,%ecx\n"},
            "SSL_write_ex changes its arguments before the call",
        ),
        ({"read_target": "other_internal"}, "SSL_read and SSL_read_ex call different functions"),
        ({"write_target": "read_internal"}, "SSL_write and SSL_write_ex call different"),
    ],
)
def test_unsure_shapes_fall_back_to_exported_entries(
    tmp_path: Path, variant: dict[str, str], reason: str
) -> None:
    path = library(tmp_path, **variant)
    symbols = local_symbols(path)

    with ElfImage(path) as image:
        placement = plan(image)

    assert placement.kind == "exported"
    assert reason in placement.note
    assert {(p.label, p.entry_program, p.address) for p in placement.probes} == {
        ("SSL_read", "ssl_read_enter", symbols["SSL_read"]),
        ("SSL_read_ex", "ssl_read_ex_enter", symbols["SSL_read_ex"]),
        ("SSL_write", "ssl_write_enter", symbols["SSL_write"]),
        ("SSL_write_ex", "ssl_write_ex_enter", symbols["SSL_write_ex"]),
    }


def test_call_through_plt_is_not_an_internal_function(tmp_path: Path) -> None:
    body = (
        ENTRY_PLAIN.format(name="SSL_read", target="ext_read@PLT")
        + ENTRY_EX.format(name="SSL_read_ex", setup="", target="ext_read@PLT")
        + ENTRY_PLAIN.format(name="SSL_write", target="ext_write@PLT")
        + ENTRY_EX.format(name="SSL_write_ex", setup="", target="ext_write@PLT")
    )
    path = assemble(tmp_path, body)

    with ElfImage(path) as image:
        placement = plan(image)

    assert placement.kind == "exported"
    assert "not an internal function" in placement.note


def test_library_without_ssl_functions(tmp_path: Path) -> None:
    path = assemble(tmp_path, INTERNAL.format(name="helper", first="    push %rbx\n"))

    with ElfImage(path) as image, pytest.raises(NotOpenSslError):
        plan(image)


def test_only_the_plain_variants_are_enough(tmp_path: Path) -> None:
    """OpenSSL 1.0 has no _ex variants: the exported entries are probed."""
    body = ENTRY_PLAIN.format(name="SSL_read", target="read_internal") + ENTRY_PLAIN.format(
        name="SSL_write", target="write_internal"
    )
    body += INTERNAL.format(name="read_internal", first="    push %rbx\n")
    body += INTERNAL.format(name="write_internal", first="    push %rbx\n")
    path = assemble(tmp_path, body)

    with ElfImage(path) as image:
        placement = plan(image)

    assert placement.kind == "exported"
    assert sorted(p.label for p in placement.probes) == ["SSL_read", "SSL_write"]


def test_not_elf_is_refused_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\x7fELF" + bytes(range(60)))

    with pytest.raises(ElfReadError, match="not a readable ELF file"):
        ElfImage(junk)


def test_signature_prefilter(tmp_path: Path) -> None:
    path = library(tmp_path)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")

    assert contains_any(path, (b"SSL_write\0",))
    assert not contains_any(path, (b"gnutls_record_send\0",))
    assert not contains_any(empty, (b"SSL_write\0",))


def test_exported_entries_when_asked(tmp_path: Path) -> None:
    path = library(tmp_path)

    with ElfImage(path) as image:
        placement = plan(image, internal=False)

    assert placement.kind == "exported"
    assert placement.note == "exported entries asked for"
    assert len(placement.probes) == 4
