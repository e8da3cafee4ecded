"""Which hook each capability gets on this kernel: the best the probed features allow.

One plan serves `flowtap run` (what to load, which maps to create, cfg.features) and
`flowtap check` and `--stats-file` (what each capability gets, or why it gets nothing).
The programs it names are those of bpf/sensor/*.bpf.c.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flowtap.loader.btf import Btf
from flowtap.loader.features import CORE_TRACEPOINTS, KernelFeatures
from flowtap.loader.kernel import BPF_TRACE_UPROBE_MULTI
from flowtap.loader.libbpf import BpfObject

CONNECTIONS = "connections"
BYTE_COUNTS = "byte counts"
PAYLOADS = "plaintext payloads"
OPENSSL = "OpenSSL"
GO = "Go"
NODE = "node"
JAVA = "Java"
EGRESS = "egress controller"
EXEC_HOLD = "exec hold"

_SEND_RECV = ("inet_sendmsg", "inet6_sendmsg", "inet_recvmsg", "inet6_recvmsg")
_OPENSSL_PROGRAMS = ("ssl_read_enter", "ssl_read_ex_enter", "ssl_write_enter", "ssl_write_ex_enter")
_GO_PROGRAMS = ("go_read_enter", "go_write_enter", "go_handshake_enter", "go_handshake_return")
# Programs built twice: full (5.17 on) and bounded (bpf/sensor/compat.h).
_LOOPING = ("ssl_return", "go_return", "java_data_enter")


@dataclass(frozen=True)
class Capability:
    name: str
    hook: str | None  # what this kernel gets; None: switched off
    detail: str  # how, or why nothing

    @property
    def available(self) -> bool:
        return self.hook is not None


@dataclass(frozen=True)
class HookPlan:
    capabilities: tuple[Capability, ...]
    programs: frozenset[str]  # non-uprobe programs to load and attach
    tls_programs: frozenset[str]  # uprobe programs to load (attached per file)
    maps_off: frozenset[str]  # maps this kernel cannot create or the plan does not use
    flags: dict[str, bool]
    thread_size: int
    variants: dict[str, str] = field(default_factory=dict)
    avoided: frozenset[str] = frozenset()
    # TLS programs load as uprobe_multi programs, linked once per program and file.
    uprobe_multi: bool = False

    def select(self, obj: BpfObject, load: Callable[[str], bool]) -> None:
        """Before load: the programs `load` keeps (among the plan's), and only the maps
        this kernel can create and the plan uses."""
        for program in obj.programs():
            program.set_autoload(load(program.name))
            if self.uprobe_multi and program.name in self.tls_programs:
                program.set_expected_attach_type(BPF_TRACE_UPROBE_MULTI)
        for name in self.maps_off:
            obj.map(name).set_autocreate(False)

    def feature_bits(self, btf: Btf) -> int:
        """cfg.features: the flags as enum ft_feature bits (bpf/flowtap.h)."""
        values = btf.enum_values("ft_feature")
        return sum(values[name] for name, on in self.flags.items() if on)

    def capability(self, name: str) -> Capability:
        return next(c for c in self.capabilities if c.name == name)

    def program(self, base: str) -> str:
        """The loaded build of a program the TLS attach code names (ssl_return, ...)."""
        return self.variants.get(base, base)

    @property
    def tls(self) -> bool:
        return self.capability(OPENSSL).available or self.capability(GO).available

    def as_dict(self) -> dict[str, Any]:
        return {c.name: {"hook": c.hook, "detail": c.detail} for c in self.capabilities} | {
            "avoided": sorted(self.avoided)
        }


def _socket_hooks(features: KernelFeatures, suffix: str) -> tuple[str | None, list[str], str]:
    """(family, programs, detail) for byte counts: tracepoints, else fexit, else kprobes."""
    if features.has("sock-tracepoints"):
        return (
            "tp_btf/sock_send_length, sock_recv_length",
            ["on_sock_send" + suffix, "on_sock_recv" + suffix],
            "after every send and receive of a socket",
        )
    functions = [f for f in (*_SEND_RECV, "inet_sendpage") if f in features.functions]
    why = f"tracepoints: {features.why_not('sock-tracepoints')}"
    if features.has("fentry"):
        return (
            "fexit/" + ", ".join(functions),
            [f"fexit_{f}{suffix}" for f in functions],
            f"TCP and UDP over IPv4 and IPv6 ({why})",
        )
    if features.has("kprobes"):
        programs = [f"kprobe_{f}" for f in functions]
        programs += [f"kretprobe_{f}{suffix}" for f in functions]
        return (
            "kprobe+kretprobe/" + ", ".join(functions),
            programs,
            f"TCP and UDP over IPv4 and IPv6 ({why}; fentry: {features.why_not('fentry')})",
        )
    reason = f"{why}; fentry: {features.why_not('fentry')}; kprobes: {features.why_not('kprobes')}"
    return None, [], reason


def full_build(features: KernelFeatures) -> tuple[bool, str]:
    """Whether the full build of the programs loads here (bpf_loop, atomics and
    bpf_for_each_map_elem: Linux 5.17 on), and why not."""
    lacking = [f for f in ("loop", "atomics", "for-each") if not features.has(f)]
    if not lacking:
        return True, "full build (bpf_loop, atomics, bpf_for_each_map_elem)"
    why = "; ".join(f"{f}: {features.why_not(f)}" for f in lacking)
    return False, f"bounded build ({why})"


def plan(features: KernelFeatures, objects_programs: Iterable[str]) -> HookPlan:
    """The plan for this kernel; every program it names must be in the object."""
    full, build = full_build(features)
    suffix = "" if full else "_bounded"
    caps: list[Capability] = []

    missing_core = [t for t in CORE_TRACEPOINTS if t not in features.tracepoints]
    programs = [p + suffix for p in ("on_tcp_state", "on_tcp_destroy", "on_exec", "on_exit")]
    programs.append("on_fork")
    family, socket_programs, socket_detail = _socket_hooks(features, suffix)
    programs += socket_programs
    dns_end = "DNS flows end at process exit (bpf_for_each_map_elem)"
    if not full:
        release = "fentry_inet_release" if family and family.startswith("fexit") else None
        if family and family.startswith("kprobe"):
            release = "kprobe_inet_release"
        if release:
            programs.append(release)
            dns_end = f"DNS flows end when their socket is released ({release})"
        else:
            dns_end = "DNS flows of exited processes end when the sensor stops"
    if missing_core:
        caps.append(
            Capability(CONNECTIONS, None, "missing tracepoints: " + ", ".join(missing_core))
        )
    else:
        caps.append(
            Capability(
                CONNECTIONS,
                "tp_btf/inet_sock_set_state, tcp_destroy_sock, sched_process_*",
                f"{build}; {dns_end}",
            )
        )
    caps.append(Capability(BYTE_COUNTS, family, socket_detail))

    regs = (
        "syscall registers from bpf_task_pt_regs"
        if features.flags()["FT_FEATURE_TASK_PT_REGS"]
        else f"syscall registers from the task's kernel stack (THREAD_SIZE {features.thread_size})"
    )
    pieces = (
        "up to 160 KiB per socket call and 2 MiB per TLS call (bpf_loop)"
        if full
        else "bounded build: up to 64 KiB per socket call and 512 KiB per TLS call; "
        "the rest shows as a gap"
    )
    caps.append(
        Capability(PAYLOADS, f"user buffers at the socket hook, {regs}", pieces)
        if family
        else Capability(PAYLOADS, None, "no socket hook (byte counts)")
    )

    tls_programs: list[str] = []
    storage = (
        "per-thread state in task storage"
        if features.flags()["FT_FEATURE_TASK_STORAGE"]
        else "per-thread state in a hash by thread id "
        f"(task storage: {features.why_not('task-storage')})"
    )
    if not features.has("uprobes"):
        off = f"uprobes: {features.why_not('uprobes')}"
        caps += [
            Capability(OPENSSL, None, off),
            Capability(GO, None, off),
            Capability(NODE, None, off),
            Capability(JAVA, None, off),
        ]
    elif family is None:
        off = "no socket hook to tie TLS calls to their connection"
        caps += [
            Capability(OPENSSL, None, off),
            Capability(GO, None, off),
            Capability(NODE, None, off),
            Capability(JAVA, None, off),
        ]
    else:
        tls_programs = [*_OPENSSL_PROGRAMS, *_GO_PROGRAMS, *(p + suffix for p in _LOOPING)]
        links = (
            "one uprobe_multi link per program and file"
            if features.has("uprobe-multi")
            else "one perf event per probed address "
            f"(uprobe_multi: {features.why_not('uprobe-multi')})"
        )
        caps.append(
            Capability(OPENSSL, "uprobe+uretprobe on SSL_read/SSL_write", f"{storage}; {links}")
        )
        caps.append(
            Capability(
                GO,
                "uprobes at (*tls.Conn).Read/Write entry and each RET",
                f"no uretprobes; {links}",
            )
        )
        caps.append(
            Capability(NODE, "uprobe+uretprobe on node's SSL_read/SSL_write", f"{storage}; {links}")
        )
        caps.append(
            Capability(
                JAVA,
                "uprobe on the JVM agent's flowtap_java_data",
                f"agent loaded by HotSpot dynamic attach; {links}",
            )
        )
    caps.append(
        Capability(EGRESS, "cgroup/connect4, connect6, sockops, cgroup/getsockopt", "--egress")
        if features.egress is None
        else Capability(EGRESS, None, features.egress)
    )
    caps.append(
        Capability(EXEC_HOLD, "fanotify FAN_OPEN_EXEC_PERM", "program start")
        if features.exec_hold is None
        else Capability(EXEC_HOLD, None, features.exec_hold)
    )

    flags = features.flags()
    maps_off = {"ssl_calls_by_thread" if flags["FT_FEATURE_TASK_STORAGE"] else "ssl_calls"}
    if full:
        maps_off.add("claims")
    if not (family and family.startswith("kprobe")):
        maps_off.add("io_calls")
    known = set(objects_programs)
    unknown = [p for p in (*programs, *tls_programs) if p not in known]
    if unknown:
        raise ValueError(f"the BPF object has no program {', '.join(unknown)}: rebuild it")
    return HookPlan(
        tuple(caps),
        frozenset(programs),
        frozenset(tls_programs),
        frozenset(maps_off),
        flags,
        features.thread_size,
        {base: base + suffix for base in _LOOPING},
        features.avoided,
        uprobe_multi=bool(tls_programs) and features.has("uprobe-multi"),
    )
