"""flowtap check: real probes on this host, plus the report format on hand-made checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowtap import preflight
from flowtap.loader import hooks, kernel
from flowtap.loader.features import CORE_TRACEPOINTS, SOCKET_TRACEPOINTS, KernelFeatures
from flowtap.loader.libbpf import BpfObject
from flowtap.loader.system import bpf_object_path
from flowtap.preflight import Check

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="probing the kernel with bpf(2) needs root"
)
needs_btf = pytest.mark.skipif(
    not Path(kernel.VMLINUX_BTF).exists(), reason="kernel exposes no vmlinux BTF"
)


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _cgroup2_mount() -> str | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return fields[1]
    return None


@needs_root
def test_run_checks_on_this_host() -> None:
    checks = _by_name(preflight.run_checks())

    for name in ("root", "btf", "ring buffer", hooks.CONNECTIONS):
        assert checks[name].ok, checks[name]
        assert checks[name].required

    # This host refuses fentry loads and has no kprobes: reported, never blocking.
    fentry = checks["fentry"]
    assert not fentry.ok
    assert not fentry.required
    assert "EPERM" in fentry.detail
    kprobes = checks["kprobes"]
    assert not kprobes.ok
    assert not kprobes.required
    # 6.18: every capability gets its best hook.
    assert checks[hooks.BYTE_COUNTS].detail.startswith("tp_btf/sock_send_length")
    assert "bpf_task_pt_regs" in checks[hooks.PAYLOADS].detail
    assert "task storage" in checks[hooks.OPENSSL].detail
    for name in (hooks.PAYLOADS, hooks.OPENSSL, hooks.GO, hooks.NODE, hooks.EXEC_HOLD):
        assert checks[name].ok, checks[name]
        assert not checks[name].required

    # The egress controller's program types load here (optional: only --egress needs them).
    assert checks[hooks.EGRESS].ok, checks[hooks.EGRESS]
    assert not checks[hooks.EGRESS].required

    cgroup2 = _cgroup2_mount()
    if cgroup2 is not None:
        assert checks["cgroup v2"].ok
        assert cgroup2 in checks["cgroup v2"].detail


@needs_root
def test_main_succeeds_on_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert preflight.main([]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("flowtap can run on this host.")
    assert "\033[" not in out  # captured stdout is not a terminal


def test_not_root_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    checks = _by_name(preflight.run_checks())
    assert not checks["root"].ok
    assert checks["ring buffer"].detail == "cannot probe: not root"
    assert checks["ring buffer"].fix == "run as root (sudo flowtap check)"
    assert checks["fentry"].detail == "cannot probe: not root"
    assert preflight.main([]) == 1


def test_report_for_a_missing_required_feature() -> None:
    checks = [
        Check("root", True, True, "effective uid 0", None),
        Check("ring buffer", False, True, "map create failed", "use Linux 5.8 or newer"),
        Check("kprobes", False, False, "not compiled in", None),
    ]
    report = preflight.format_report(checks, color=False)
    lines = report.splitlines()

    assert "\033[" not in report
    assert lines[0].startswith(f"{preflight.MARK_OK} root ")
    assert lines[1].startswith(f"{preflight.MARK_MISSING} ring buffer ")
    assert "missing" in lines[1]
    assert "fix: use Linux 5.8 or newer" in lines[2]
    assert lines[3].startswith(f"{preflight.MARK_OPTIONAL} kprobes ")
    # Details start in one column whatever the name length.
    assert lines[0].index("effective") == lines[1].index("map create")
    assert lines[-1] == ("flowtap cannot run: 1 required feature(s) missing; see the fixes above.")


def test_report_when_everything_required_passes() -> None:
    checks = [
        Check("root", True, True, "effective uid 0", None),
        Check("fentry", False, False, "refused by the kernel (EPERM)", None),
    ]
    report = preflight.format_report(checks, color=False)
    assert report.splitlines()[-1] == "flowtap can run on this host."
    coloured = preflight.format_report(checks, color=True)
    assert "\033[32m" in coloured


@needs_btf
def test_btf_walker_finds_tracepoint_typedef() -> None:
    key = (kernel.BTF_KIND_TYPEDEF, "btf_trace_sched_process_exec")
    ids = kernel.find_btf_ids([key, (kernel.BTF_KIND_TYPEDEF, "no_such_type_xyz")])
    assert ids[key] > 0
    assert len(ids) == 1


def test_btf_walker_rejects_non_btf(tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"\0" * 64)
    with pytest.raises(kernel.BtfError):
        kernel.find_btf_ids([(kernel.BTF_KIND_FUNC, "tcp_connect")], str(bogus))


@needs_root
def test_avoided_features_get_the_fallbacks(capsys: pytest.CaptureFixture[str]) -> None:
    """What 5.10 gets (no bpf_loop, task storage, task_pt_regs, atomics), forced here."""
    avoid = "loop,task-storage,task-btf,task-pt-regs,atomics,socket-cookie,for-each"
    assert preflight.main(["--avoid-kernel-features", avoid, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "syscall registers from the task's kernel stack (THREAD_SIZE 16384)" in out
    assert "per-thread state in a hash by thread id" in out
    assert "bounded build: up to 64 KiB per socket call and 512 KiB per TLS call" in out
    assert "avoided (--avoid-kernel-features)" in out


def test_unknown_avoided_feature_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        preflight.main(["--avoid-kernel-features", "loop,warp-drive"])
    assert "unknown warp-drive" in capsys.readouterr().err


def _features(**missing: str) -> KernelFeatures:
    """A kernel with every core tracepoint and socket function, less `missing`."""
    return KernelFeatures(
        "test",
        frozenset((*CORE_TRACEPOINTS, *SOCKET_TRACEPOINTS)),
        frozenset(("inet_sendmsg", "inet6_sendmsg", "inet_recvmsg", "inet6_recvmsg")),
        {name.replace("_", "-"): why for name, why in missing.items()},
    )


def _all_programs() -> list[str]:
    obj = BpfObject.open(bpf_object_path("conn.bpf.o"))
    try:
        return [program.name for program in obj.programs()]
    finally:
        obj.close()


def test_plan_for_debian_12_kernel() -> None:
    """6.1: no socket tracepoints (6.3): fexit on the inet functions, bpf_loop builds."""
    plan = hooks.plan(_features(sock_tracepoints="6.3", uprobe_multi="Linux 6.6"), _all_programs())
    assert not plan.uprobe_multi
    assert "one perf event per probed address" in plan.capability(hooks.GO).detail
    assert plan.capability(hooks.BYTE_COUNTS).hook == (
        "fexit/inet_sendmsg, inet6_sendmsg, inet_recvmsg, inet6_recvmsg"
    )
    assert "fexit_inet_sendmsg" in plan.programs
    assert "on_sock_send" not in plan.programs
    assert plan.program("ssl_return") == "ssl_return"
    assert "io_calls" in plan.maps_off and "ssl_calls_by_thread" in plan.maps_off


def test_plan_for_debian_11_kernel() -> None:
    """5.10: no tracepoints, bpf_loop, for_each, task storage or atomics."""
    missing = dict.fromkeys(
        (
            "sock_tracepoints",
            "loop",
            "for_each",
            "task_storage",
            "task_btf",
            "atomics",
            "socket_cookie",
        ),
        "5.10",
    )
    plan = hooks.plan(_features(**missing, task_pt_regs="5.15"), _all_programs())
    assert {"fexit_inet_recvmsg_bounded", "on_exec_bounded", "on_exit_bounded"} <= plan.programs
    assert "fentry_inet_release" in plan.programs
    assert plan.program("go_return") == "go_return_bounded"
    assert "ssl_calls" in plan.maps_off and "claims" not in plan.maps_off
    assert not any(plan.flags.values())
    assert "bounded build" in plan.capability(hooks.CONNECTIONS).detail


def test_plan_with_uprobe_multi_links_tls_programs_once_per_file() -> None:
    """6.6 on: the TLS programs load for uprobe_multi links; the others do not."""
    plan = hooks.plan(_features(), _all_programs())
    assert plan.uprobe_multi
    assert "one uprobe_multi link per program and file" in plan.capability(hooks.OPENSSL).detail
    obj = BpfObject.open(bpf_object_path("conn.bpf.o"))
    try:
        plan.select(obj, lambda name: name in plan.programs or name in plan.tls_programs)
        types = {p.name: p.expected_attach_type for p in obj.programs() if p.autoload}
    finally:
        obj.close()
    assert {types[name] for name in plan.tls_programs} == {kernel.BPF_TRACE_UPROBE_MULTI}
    assert kernel.BPF_TRACE_UPROBE_MULTI not in {types[name] for name in plan.programs}


def test_plan_with_kprobes_only() -> None:
    plan = hooks.plan(_features(sock_tracepoints="6.3", fentry="EPERM"), _all_programs())
    hook = plan.capability(hooks.BYTE_COUNTS).hook
    assert hook is not None
    assert hook.startswith("kprobe+kretprobe/")
    assert {"kprobe_inet_sendmsg", "kretprobe_inet_sendmsg"} <= plan.programs
    assert "io_calls" not in plan.maps_off


def test_plan_without_any_socket_hook_keeps_connections() -> None:
    plan = hooks.plan(
        _features(sock_tracepoints="6.3", fentry="EPERM", kprobes="unset"), _all_programs()
    )
    assert plan.capability(hooks.CONNECTIONS).available
    byte_counts = plan.capability(hooks.BYTE_COUNTS)
    assert byte_counts.hook is None
    assert "fentry: EPERM" in byte_counts.detail and "kprobes: unset" in byte_counts.detail
    assert not plan.capability(hooks.OPENSSL).available
    assert not plan.tls_programs
