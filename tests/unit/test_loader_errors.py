"""Load failures explained: the verifier's real reason, and only true hints."""

from __future__ import annotations

import errno

from flowtap.loader.errors import explain, verifier_reason

# What libbpf 1.1 prints for a refused program, split into lines as the print callback
# keeps them: hundreds of instruction lines, then the reason, then statistics.
_LOG = [
    "libbpf: prog 'on_tcp_destroy': BPF program load failed: Invalid argument",
    "libbpf: prog 'on_tcp_destroy': -- BEGIN PROG LOAD LOG --",
    *[f"{i}: (bf) r{i % 9} = r10 ; R10=fp0" for i in range(500)],
    "BPF_STX uses reserved fields",
    "processed 0 insns (limit 1000000) max_states_per_insn 0 total_states 0",
    "-- END PROG LOAD LOG --",
    "libbpf: prog 'on_tcp_destroy': failed to load: -22",
    "libbpf: failed to load object 'conn.bpf.o'",
]


def test_the_reason_at_the_end_of_a_long_log_is_quoted() -> None:
    assert verifier_reason(_LOG)[-1] == "BPF_STX uses reserved fields"
    error = explain("load BPF program", errno.EINVAL, subject="on_tcp_destroy", libbpf_log=_LOG)
    assert "kernel said: BPF_STX uses reserved fields" in str(error)
    assert "processed 0 insns" not in str(error)


def test_btf_in_a_log_is_no_reason_to_blame_the_kernel_btf() -> None:
    """5.10 has BTF: a refusal whose log mentions BTF must not say the kernel lacks it."""
    log = [*_LOG[:2], "invalid btf_id for map 'ssl_calls'", *_LOG[-4:]]
    error = explain("load BPF program", errno.EINVAL, subject="x", libbpf_log=log)
    assert error.fix is None or "no usable BTF" not in error.fix
    missing = explain(
        "open BPF object",
        errno.EINVAL,
        libbpf_log=["libbpf: failed to find valid kernel BTF"],
    )
    assert missing.fix is not None and "no usable BTF" in missing.fix


def test_a_log_without_a_verifier_section_keeps_the_hinted_lines() -> None:
    log = ["libbpf: map 'events': failed to create: Invalid argument(-22)"]
    assert verifier_reason(log) == []
    error = explain("load BPF program", errno.EINVAL, libbpf_log=log)
    assert "kernel said: libbpf: map 'events': failed to create" in str(error)
