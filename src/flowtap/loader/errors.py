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
            "this kernel refuses fentry/fexit/lsm programs (lockdown or policy); "
            "flowtap uses tracepoints instead: check `flowtap check`"
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
    elif err == errno.EINVAL and any("BTF" in line for line in libbpf_log):
        fix = "the kernel has no usable BTF: use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    elif err == errno.ENOMEM:
        fix = "raise the memlock limit (ulimit -l unlimited) or free memory"
    details = [line for line in libbpf_log if line.strip()]
    reasons = [line for line in details if _VERIFIER_HINT.search(line)]
    if reasons and err in (errno.EINVAL, errno.EACCES):
        message += "\n  kernel said: " + "\n  kernel said: ".join(reasons[-5:])
    return BpfError(message, fix=fix, errno_value=err, details=details)
