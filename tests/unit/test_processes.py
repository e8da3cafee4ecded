"""Process registry and container ids, on a fake /proc tree."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from flowtap.events import Exec, Exit, Task
from flowtap.tracking import processes
from flowtap.tracking.processes import ProcessInfo, ProcessRegistry, container_id_from_cgroup

AddProcess = Callable[..., Path]

ID = "0123456789abcdef" * 4
ID2 = "fedcba9876543210" * 4
POD = "pod8a9b7c6d_1e2f_4a3b_9c8d_7e6f5a4b3c2d"


@pytest.mark.parametrize(
    "text",
    [
        # docker, systemd cgroup driver (cgroup v2)
        f"0::/system.slice/docker-{ID}.scope\n",
        # docker, cgroupfs driver (cgroup v1, several hierarchies)
        f"12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n0::/docker/{ID}\n",
        # containerd under Kubernetes, systemd driver
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice/"
        f"cri-containerd-{ID}.scope\n",
        # CRI-O
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{POD}.slice/"
        f"crio-{ID}.scope\n",
        # podman
        f"0::/machine.slice/libpod-{ID}.scope/container\n",
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope\n",
        # Kubernetes, cgroupfs driver
        f"11:cpu,cpuacct:/kubepods/besteffort/pod8a9b7c6d-1e2f-4a3b-9c8d-7e6f5a4b3c2d/{ID}\n",
        f"0::/kubepods/burstable/pod8a9b7c6d-1e2f-4a3b-9c8d-7e6f5a4b3c2d/{ID}\n",
        # host lines first, container later (cgroup v1 with a named hierarchy)
        f"13:misc:/\n12:name=systemd:/init.scope\n1:cpuset:/docker/{ID}\n",
        # the leaf names an exec event carries (no leading slash)
        f"docker-{ID}.scope",
        f"cri-containerd-{ID}.scope",
        ID,
    ],
)
def test_container_id_found(text: str) -> None:
    assert container_id_from_cgroup(text) == ID


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0::/\n",
        "0::/init.scope\n",
        "0::/user.slice/user-1000.slice/session-3.scope\n",
        "0::/system.slice/docker.service\n",
        "0::/system.slice/containerd.service\n",
        "12:memory:/user.slice\n11:pids:/\n",
        f"0::/system.slice/docker-{ID[:-1]}.scope\n",  # 63 hex digits
        f"0::/system.slice/docker-{ID.upper()}.scope\n",  # ids are lowercase
        f"0::/system.slice/docker-{ID}0.scope\n",  # 65 hex digits
        "session-3.scope",
    ],
)
def test_no_container_on_the_host(text: str) -> None:
    assert container_id_from_cgroup(text) is None


def test_first_container_line_wins() -> None:
    text = f"2:memory:/docker/{ID}\n1:cpu:/docker/{ID2}\n"
    assert container_id_from_cgroup(text) == ID


# --- the registry on a fake /proc ----------------------------------------------------


@pytest.fixture
def tree(add_process: AddProcess) -> None:
    """1 (init) -> 100 (sh) -> 200 (weird comm) -> 300; 1 -> 150 (in a container)."""
    add_process(1, comm="systemd", ppid=0, exe="/usr/lib/systemd/systemd", cmdline=("/sbin/init",))
    add_process(100, comm="sh", ppid=1, exe="/usr/bin/dash", cmdline=("sh", "-c", "run me"))
    add_process(
        200,
        comm="my (weird) prog",
        stat_comm="my (weird) ) 3 prog",  # the kernel does not escape ')' or spaces
        ppid=100,
        uid=0,
        exe="/opt/weird/prog (deleted)",
        cmdline=("./prog", "", "--flag"),
    )
    add_process(300, comm="child", ppid=200, exe=None)
    add_process(
        150,
        comm="nginx",
        ppid=1,
        uid=0,
        exe="/usr/sbin/nginx",
        cgroup=f"0::/system.slice/docker-{ID}.scope\n",
    )


@pytest.mark.usefixtures("tree")
def test_scan_counts_only_processes(proc_root: Path) -> None:
    registry = ProcessRegistry(proc_root)

    assert registry.scan() == 5
    assert len(registry) == 5


@pytest.mark.usefixtures("tree")
def test_scan_skips_a_process_that_vanished(proc_root: Path) -> None:
    (proc_root / "300" / "status").unlink()  # exited between listdir and read
    registry = ProcessRegistry(proc_root)

    assert registry.scan() == 4


@pytest.mark.usefixtures("tree")
def test_lookup_reads_proc(proc_root: Path) -> None:
    registry = ProcessRegistry(proc_root)

    info = registry.lookup(Task(pid=200, tid=201, uid=0, comm="ignored"))

    assert info == ProcessInfo(
        pid=200,
        exe="/opt/weird/prog (deleted)",
        comm="my (weird) prog",
        cmdline=("./prog", "--flag"),  # empty arguments are dropped
        uid=0,
        user="root",
        container_id=None,
        ppid=100,
    )


@pytest.mark.usefixtures("tree")
def test_lookup_container_and_missing_exe(proc_root: Path) -> None:
    registry = ProcessRegistry(proc_root)

    nginx = registry.lookup(Task(pid=150, tid=150, uid=0, comm="nginx"))
    child = registry.lookup(Task(pid=300, tid=300, uid=0, comm="child"))

    assert nginx.container_id == ID
    assert nginx.exe == "/usr/sbin/nginx"
    assert child.exe is None  # exe unreadable (kernel thread, or permission)
    assert child.comm == "child"


@pytest.mark.usefixtures("tree")
def test_lookup_is_cached_after_scan(proc_root: Path) -> None:
    registry = ProcessRegistry(proc_root)
    registry.scan()
    shutil.rmtree(proc_root / "100")

    info = registry.lookup(Task(pid=100, tid=100, uid=0, comm="other"))

    assert info.exe == "/usr/bin/dash"
    assert info.cmdline == ("sh", "-c", "run me")


def test_lookup_of_an_unknown_pid_uses_the_task(proc_root: Path) -> None:
    registry = ProcessRegistry(proc_root)

    info = registry.lookup(Task(pid=777, tid=778, uid=0, comm="gone"))

    assert info == ProcessInfo(
        pid=777, exe=None, comm="gone", cmdline=(), uid=0, user="root", container_id=None
    )


def test_unknown_uid_has_no_user_name(proc_root: Path, add_process: AddProcess) -> None:
    add_process(500, uid=3_999_999_999)
    registry = ProcessRegistry(proc_root)

    info = registry.lookup(Task(pid=500, tid=500, uid=3_999_999_999, comm="curl"))

    assert info.uid == 3_999_999_999
    assert info.user is None


@pytest.mark.usefixtures("tree")
def test_children_follows_the_tree(proc_root: Path) -> None:
    registry = ProcessRegistry(proc_root)

    assert registry.children(100) == {100, 200, 300}
    assert registry.children(200) == {200, 300}
    assert registry.children(300) == {300}
    assert registry.children(1) == {1, 100, 150, 200, 300}


def test_children_of_a_pid_that_is_not_running(proc_root: Path) -> None:
    assert ProcessRegistry(proc_root).children(4000) == {4000}


def exec_event(
    pid: int,
    *,
    filename: str = "/usr/bin/true",
    cgroup_name: str = f"docker-{ID}.scope",
    argv: tuple[str, ...] = ("true", "--version"),
) -> Exec:
    return Exec(
        timestamp_ns=1,
        task=Task(pid=pid, tid=pid, uid=0, comm="true"),
        ppid=100,
        cgroup_id=42,
        filename=filename,
        cgroup_name=cgroup_name,
        argv=argv,
    )


def test_on_exec_of_a_process_that_is_gone(proc_root: Path) -> None:
    """A short-lived process: exited before we look, still named from its exec event."""
    registry = ProcessRegistry(proc_root)

    info = registry.on_exec(exec_event(999))

    assert info == ProcessInfo(
        pid=999,
        exe="/usr/bin/true",
        comm="true",
        cmdline=("true", "--version"),
        uid=0,
        user="root",
        container_id=ID,
        ppid=100,
    )
    assert registry.lookup(Task(pid=999, tid=1000, uid=0, comm="x")) is info


def test_on_exec_gone_resolves_symlinks_like_proc_exe(proc_root: Path, tmp_path: Path) -> None:
    """execve() of a venv's bin/python: /proc/PID/exe would name the real binary."""
    real = tmp_path / "python3.11"
    real.write_text("")
    link = tmp_path / "venv-python"
    link.symlink_to(real)
    registry = ProcessRegistry(proc_root)

    assert registry.on_exec(exec_event(998, filename=str(link))).exe == str(real)
    assert registry.on_exec(exec_event(997, filename="./relative")).exe == "./relative"


def test_on_exec_gone_without_filename_or_container(proc_root: Path) -> None:
    registry = ProcessRegistry(proc_root)

    info = registry.on_exec(exec_event(999, filename="", cgroup_name="session-1.scope"))

    assert info.exe is None
    assert info.container_id is None


def test_on_exec_prefers_proc(proc_root: Path, add_process: AddProcess) -> None:
    add_process(
        600,
        comm="python3",
        exe="/usr/bin/python3.11",
        cgroup=f"0::/system.slice/docker-{ID2}.scope\n",
    )
    registry = ProcessRegistry(proc_root)

    info = registry.on_exec(
        exec_event(600, filename="/usr/bin/python3", argv=("python3", "-m", "http.server"))
    )

    assert info.exe == "/usr/bin/python3.11"  # the resolved binary, not the path exec'd
    assert info.container_id == ID2
    assert info.cmdline == ("python3", "-m", "http.server")  # argv as exec'd


def test_exec_replaces_what_was_known(proc_root: Path, add_process: AddProcess) -> None:
    add_process(700, comm="sh", exe="/usr/bin/dash", cmdline=("sh",))
    registry = ProcessRegistry(proc_root)
    registry.scan()
    shutil.rmtree(proc_root / "700")

    registry.on_exec(exec_event(700, filename="/usr/bin/curl", argv=("curl", "x")))

    info = registry.lookup(Task(pid=700, tid=700, uid=0, comm="curl"))
    assert info.exe == "/usr/bin/curl"
    assert info.cmdline == ("curl", "x")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_exited_processes_are_kept_for_a_grace_period(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(processes, "time", clock)
    registry = ProcessRegistry(proc_root)
    registry.on_exec(exec_event(801))
    registry.on_exec(exec_event(802))

    registry.on_exit(Exit(timestamp_ns=2, task=Task(pid=801, tid=801, uid=0, comm="true")))
    clock.now += 29
    registry.on_exit(Exit(timestamp_ns=3, task=Task(pid=802, tid=802, uid=0, comm="true")))
    assert registry.lookup(Task(pid=801, tid=801, uid=0, comm="true")).exe == "/usr/bin/true"

    clock.now += 2  # 801 exited 31 s ago; 802 only 2 s ago
    registry.on_exit(Exit(timestamp_ns=4, task=Task(pid=803, tid=803, uid=0, comm="x")))

    assert registry.lookup(Task(pid=801, tid=801, uid=0, comm="reused")).exe is None
    assert registry.lookup(Task(pid=802, tid=802, uid=0, comm="true")).exe == "/usr/bin/true"
