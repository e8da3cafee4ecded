"""The libbpf binding against the running kernel: uprobe, uretprobe and cgroup links.

Uses test-only programs (tests/bpf/loader_probe.bpf.c, built by `make test-bpf`): a uprobe
on a function of a program this test compiles, and a cgroup/connect4 program that only
counts, attached to a cgroup this test creates and removes.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowtap.loader.btf import Btf
from flowtap.loader.errors import BpfError
from flowtap.loader.libbpf import BpfObject
from flowtap.loader.system import cgroup2_mount

ROOT = Path(__file__).resolve().parents[2]
PROBE_OBJECT = ROOT / "build" / "tests" / "loader_probe.bpf.o"
TARGET_SOURCE = r"""
#include <stdio.h>
__attribute__((noinline)) long flowtap_probe_target(long x) { return x * 2 + 1; }
int main(void) {
    long total = 0;
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;   /* wait until the probe is attached */
    for (long i = 0; i < 5; i++) total += flowtap_probe_target(40 + i);
    printf("%ld\n", total);
    return 0;
}
"""

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root"),
]


def symbol_file_offset(binary: Path, symbol: str) -> int:
    """File offset of a function: its address minus its segment's (vaddr - offset)."""
    symbols = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True)
    address = next(
        int(line.split()[0], 16) for line in symbols.stdout.splitlines() if line.endswith(symbol)
    )
    headers = subprocess.run(
        ["readelf", "-lW", str(binary)], capture_output=True, text=True, check=True
    )
    for line in headers.stdout.splitlines():
        fields = line.split()
        if fields[:1] == ["LOAD"]:
            offset, vaddr, size = int(fields[1], 16), int(fields[2], 16), int(fields[5], 16)
            if vaddr <= address < vaddr + size:
                return address - vaddr + offset
    raise AssertionError(f"{symbol} is in no LOAD segment of {binary}")


def read_global(obj: BpfObject, btf: Btf, name: str) -> int:
    offset, size = btf.variable_offset(".bss", name)
    image = obj.map(".bss").lookup(struct.pack("<I", 0))
    assert image is not None
    return int.from_bytes(image[offset : offset + size], "little")


@pytest.fixture
def probe_object() -> Iterator[tuple[BpfObject, Btf]]:
    assert PROBE_OBJECT.exists(), "build the test objects first: make test-bpf"
    obj = BpfObject.open(PROBE_OBJECT)
    try:
        yield obj, Btf(obj)
    finally:
        obj.close()


@pytest.fixture
def target_binary(tmp_path: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the uprobe target")
    source = tmp_path / "target.c"
    source.write_text(TARGET_SOURCE)
    binary = tmp_path / "target"
    subprocess.run(["gcc", "-O1", "-o", str(binary), str(source)], check=True)
    return binary


def test_uprobe_and_uretprobe_see_calls_of_one_process(
    probe_object: tuple[BpfObject, Btf], target_binary: Path
) -> None:
    obj, btf = probe_object
    target = subprocess.Popen(
        [str(target_binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        offset, _ = btf.variable_offset(".rodata", "target_tgid")
        obj.map(".rodata").write_initial_value(offset, struct.pack("<I", target.pid))
        obj.load()
        function_offset = symbol_file_offset(target_binary, "flowtap_probe_target")
        entry = obj.program("count_call").attach_uprobe(
            str(target_binary), function_offset, pid=target.pid
        )
        exit_ = obj.program("record_return").attach_uprobe(
            str(target_binary), function_offset, pid=target.pid, retprobe=True
        )
        output, _ = target.communicate("go\n", timeout=10)
        assert target.returncode == 0
        assert int(output) == sum(x * 2 + 1 for x in range(40, 45))
        assert read_global(obj, btf, "uprobe_hits") == 5
        assert read_global(obj, btf, "uprobe_last_arg") == 44
        assert read_global(obj, btf, "uretprobe_last_ret") == 89
        entry.destroy()
        exit_.destroy()
        assert not entry.attached
    finally:
        if target.poll() is None:
            target.kill()
            target.wait(timeout=5)


def test_uprobe_on_missing_binary_is_explained(probe_object: tuple[BpfObject, Btf]) -> None:
    obj, _ = probe_object
    obj.load()
    with pytest.raises(BpfError) as failure:
        obj.program("count_call").attach_uprobe("/nonexistent/flowtap-binary", 0x1000)
    assert "cannot attach uprobe" in str(failure.value)
    assert failure.value.errno_value is not None


def test_cgroup_link_counts_connects_in_its_cgroup_only(
    probe_object: tuple[BpfObject, Btf],
) -> None:
    obj, btf = probe_object
    root = cgroup2_mount()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    cgroup = root / f"flowtap-test-{uuid.uuid4().hex[:12]}"
    cgroup.mkdir()
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1]))).close()"
    try:
        obj.load()
        link = obj.program("count_connect4").attach_cgroup(fd)
        try:
            inside = subprocess.Popen(
                ["python3", "-c", client, str(port)],
                preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())),
            )
            assert inside.wait(timeout=10) == 0
            outside = subprocess.run(["python3", "-c", client, str(port)], timeout=10)
            assert outside.returncode == 0
            assert read_global(obj, btf, "connect4_calls") == 1
        finally:
            link.destroy()
        shown = subprocess.run(
            ["bpftool", "cgroup", "show", str(cgroup)], capture_output=True, text=True
        )
        assert "count_connect4" not in shown.stdout
    finally:
        listener.close()
        os.close(fd)
        cgroup.rmdir()


def test_refused_program_type_is_explained(probe_object: tuple[BpfObject, Btf]) -> None:
    obj, _ = probe_object
    for program in obj.programs():
        program.set_autoload(program.name == "refused_fentry")
    try:
        obj.load()
    except BpfError as failure:
        # This kernel (lockdown) refuses fentry: the message must say what to use instead.
        assert "refused_fentry (fentry/tcp_connect)" in failure.message
        assert failure.fix is not None
        assert "refuses fentry/fexit programs" in failure.fix
        assert "--avoid-kernel-features fentry" in failure.fix
    else:
        pytest.skip("this kernel accepts fentry programs")
