"""Loader failures, explained: what went wrong and what the user can do about it."""

from __future__ import annotations

import errno
import os
import re


class BpfError(Exception):
    """A failure to open, load or attach BPF programs, with the fix for it."""

    def __init__(
        self,
        message: str,
        *,
        fix: str | None = None,
        errno_value: int | None = None,
        details: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.errno_value = errno_value
        self.details = details or []

    def __str__(self) -> str:
        text = self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


_VERIFIER_HINT = re.compile(r"(invalid|unknown|not allowed|R\d+|expected|unreleased|prog)", re.I)
# What libbpf says when the kernel's own BTF cannot be had (and only then).
_NO_KERNEL_BTF = "failed to find valid kernel BTF"
_LOG_END = "-- END PROG LOAD LOG --"
# The verifier's closing statistics, after its reason.
_LOG_STATS = ("processed ", "verification time", "stack depth", "max_states_per_insn")


def verifier_reason(lines: list[str], count: int = 4) -> list[str]:
    """The last lines of the verifier's log before its statistics: where it says why."""
    if _LOG_END not in lines:
        return []
    end = len(lines) - 1 - lines[::-1].index(_LOG_END)
    reason: list[str] = []
    for line in reversed(lines[:end]):
        if "-- BEGIN PROG LOAD LOG --" in line:
            break
        if line.strip() and not line.startswith(_LOG_STATS):
            reason.insert(0, line.strip())
            if len(reason) == count:
                break
    return reason


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


def explain(action: str, err: int, *, subject: str = "", libbpf_log: list[str]) -> BpfError:
    """Turns an errno from libbpf into a BpfError that says what to do."""
    what = f"{action} {subject}".strip()
    message = f"cannot {what}: {os.strerror(err)} ({_errno_name(err)})"
    fix: str | None = None
    is_root = os.geteuid() == 0
    if err in (errno.EPERM, errno.EACCES) and not is_root:
        fix = "run flowtap as root (it needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)"
    elif err == errno.EPERM and any(s in subject for s in ("fentry", "fexit", "lsm")):
        fix = (
            "this kernel refuses fentry/fexit programs here (lockdown or policy): run with "
            "--avoid-kernel-features fentry to take the next hook; `flowtap check` shows "
            "what each capability gets"
        )
    elif err == errno.EPERM:
        fix = "the kernel refused it although we are root: see `flowtap check` (lockdown, LSM)"
    elif err == errno.ENOENT and "tracepoint" in subject:
        fix = (
            "the tracepoint is missing or tracefs is not mounted: "
            "mount -t tracefs tracefs /sys/kernel/tracing"
        )
    elif err == errno.ENOENT and "uprobe" in action:
        fix = "the binary or function is gone: check the path and offset"
    elif err == errno.ESRCH and "tp_btf" in subject:
        fix = "this kernel has no such tracepoint (needs Linux >= 6.3 for sock_send_length)"
    elif err == errno.EINVAL and any(_NO_KERNEL_BTF in line for line in libbpf_log):
        fix = "the kernel has no usable BTF: use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    elif err == errno.ENOMEM:
        fix = "raise the memlock limit (ulimit -l unlimited) or free memory"
    details = [line for line in libbpf_log if line.strip()]
    reasons = (
        verifier_reason(details) or [line for line in details if _VERIFIER_HINT.search(line)][-5:]
    )
    if reasons and err in (errno.EINVAL, errno.EACCES, errno.E2BIG):
        message += "\n  kernel said: " + "\n  kernel said: ".join(reasons)
    return BpfError(message, fix=fix, errno_value=err, details=details)
