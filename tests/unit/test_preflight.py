"""flowtap check: real probes on this host, plus the report format on hand-made checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowtap import preflight
from flowtap.preflight import Check

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="probing the kernel with bpf(2) needs root"
)
needs_btf = pytest.mark.skipif(
    not Path(preflight.VMLINUX_BTF).exists(), reason="kernel exposes no vmlinux BTF"
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

    for name in ("root", "btf", "ring buffer", "tp_btf"):
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

    # The egress controller's program types load here (optional: only --egress needs them).
    assert checks["egress"].ok, checks["egress"]
    assert not checks["egress"].required

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
    for name in ("ring buffer", "tp_btf"):
        assert checks[name].detail == "cannot probe: not root"
        assert checks[name].fix == "run as root (sudo flowtap check)"
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
    key = (preflight.BTF_KIND_TYPEDEF, "btf_trace_sched_process_exec")
    ids = preflight.find_btf_ids([key, (preflight.BTF_KIND_TYPEDEF, "no_such_type_xyz")])
    assert ids[key] > 0
    assert len(ids) == 1


def test_btf_walker_rejects_non_btf(tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"\0" * 64)
    with pytest.raises(preflight.BtfError):
        preflight.find_btf_ids([(preflight.BTF_KIND_FUNC, "tcp_connect")], str(bogus))
