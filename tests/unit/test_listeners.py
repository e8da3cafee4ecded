"""Listeners that predate the sensor (/proc/net/tcp{,6}, /proc/PID/fd) and in_cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowtap.tracking import processes
from flowtap.tracking.listeners import (
    Listener,
    existing_listeners,
    listening_inodes,
    socket_owners,
)
from flowtap.tracking.processes import in_cgroup

HEADER_V4 = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode"
)
HEADER_V6 = (
    "  sl  local_address                         remote_address                        st"
    " tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
)


def row(
    slot: int, local: str, remote: str, state: str, inode: int, *, uid: int = 0, tail: bool = True
) -> str:
    """One line of /proc/net/tcp{,6}, laid out as the kernel prints it."""
    line = (
        f"  {slot:2d}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000"
        f" {uid:5d}        0 {inode}"
    )
    if tail:
        line += " 1 0000000000000000 100 0 0 10 0"
    return line


def v4_row(slot: int, port: int, state: str, inode: int, *, ip: str = "00000000") -> str:
    remote = "00000000:0000" if state == "0A" else "0100007F:D431"
    return row(slot, f"{ip}:{port:04X}", remote, state, inode)


def v6_row(slot: int, port: int, state: str, inode: int) -> str:
    zero = "0" * 32
    remote = f"{zero}:0000" if state == "0A" else "0000000000000000FFFF00000100007F:D431"
    return row(slot, f"{zero}:{port:04X}", remote, state, inode)


def write_tables(proc: Path, *, tcp: list[str] | None, tcp6: list[str] | None) -> None:
    """Writes /proc/net/tcp and tcp6 (None: that file is missing)."""
    net = proc / "net"
    net.mkdir(exist_ok=True)
    for name, header, rows in (("tcp", HEADER_V4, tcp), ("tcp6", HEADER_V6, tcp6)):
        if rows is not None:
            (net / name).write_text("\n".join([header, *rows]) + "\n")


def add_fds(proc: Path, pid: int, targets: dict[int, str]) -> Path:
    """/proc/PID/fd with one symlink per descriptor, pointing at targets[fd]."""
    fd_dir = proc / str(pid) / "fd"
    fd_dir.mkdir(parents=True)
    for fd, target in targets.items():
        (fd_dir / str(fd)).symlink_to(target)  # dangling, as in /proc: only readlink()
    return fd_dir


# --- listening_inodes ------------------------------------------------------------------


def test_ipv4_and_ipv6_listeners(proc_root: Path) -> None:
    write_tables(
        proc_root,
        tcp=[
            v4_row(0, 80, "0A", 1001),
            v4_row(1, 8080, "0A", 1002, ip="0100007F"),  # 127.0.0.1
        ],
        tcp6=[v6_row(0, 443, "0A", 2001)],
    )

    assert listening_inodes(proc_root) == {1001: 80, 1002: 8080, 2001: 443}


def test_port_is_hex(proc_root: Path) -> None:
    write_tables(proc_root, tcp=[v4_row(0, 0xFFFF, "0A", 7), v4_row(1, 1, "0A", 8)], tcp6=None)

    assert listening_inodes(proc_root) == {7: 65535, 8: 1}


@pytest.mark.parametrize(
    "state",
    # include/net/tcp_states.h as /proc prints them; 0A (LISTEN) is the only one kept
    ["01", "02", "03", "04", "05", "06", "07", "08", "09", "0B", "0C"],
)
def test_rows_not_in_listen_are_ignored(proc_root: Path, state: str) -> None:
    write_tables(
        proc_root,
        tcp=[v4_row(0, 80, "0A", 1001), v4_row(1, 51234, state, 1002)],
        tcp6=[v6_row(0, 443, state, 2001)],
    )

    assert listening_inodes(proc_root) == {1001: 80}


def test_established_rows_of_a_busy_host_are_ignored(proc_root: Path) -> None:
    """Connections to a listening port show that port as local: only LISTEN rows count."""
    write_tables(
        proc_root,
        tcp=[
            v4_row(0, 80, "0A", 1001),
            v4_row(1, 80, "01", 0),  # accepted connection on port 80, inode 0 once orphaned
            v4_row(2, 80, "06", 0),  # TIME_WAIT
        ],
        tcp6=[],
    )

    assert listening_inodes(proc_root) == {1001: 80}


def test_short_and_blank_rows_are_ignored(proc_root: Path) -> None:
    full = v4_row(3, 22, "0A", 3003)
    write_tables(
        proc_root,
        tcp=[
            "",
            "   ",
            "  0: 00000000:0050 00000000:0000 0A",  # cut after the state
            " ".join(full.split()[:9]),  # everything up to the inode, not the inode
            full,
        ],
        tcp6=["garbage"],
    )

    assert listening_inodes(proc_root) == {3003: 22}


@pytest.mark.parametrize(
    "bad",
    [
        row(0, "00000000", "00000000:0000", "0A", 1001),  # no ':port'
        row(0, "00000000:ZZZZ", "00000000:0000", "0A", 1001),  # port not hex
        row(0, "00000000:0050", "00000000:0000", "0A", 1001).replace(" 1001 ", " x1001 "),
    ],
)
def test_malformed_listen_rows_are_ignored(proc_root: Path, bad: str) -> None:
    write_tables(proc_root, tcp=[bad, v4_row(1, 22, "0A", 3003)], tcp6=None)

    assert listening_inodes(proc_root) == {3003: 22}


def test_first_line_is_the_header(proc_root: Path) -> None:
    """The first line is skipped whatever it holds."""
    net = proc_root / "net"
    net.mkdir()
    (net / "tcp").write_text(v4_row(0, 80, "0A", 1001) + "\n" + v4_row(1, 81, "0A", 1002) + "\n")

    assert listening_inodes(proc_root) == {1002: 81}


def test_row_without_the_kernel_tail(proc_root: Path) -> None:
    """Ten fields are enough: the inode is the tenth."""
    write_tables(
        proc_root,
        tcp=[row(0, "00000000:0050", "00000000:0000", "0A", 1001, tail=False)],
        tcp6=None,
    )

    assert listening_inodes(proc_root) == {1001: 80}


@pytest.mark.parametrize(
    ("tcp", "tcp6", "expected"),
    [
        (None, None, {}),
        ([v4_row(0, 80, "0A", 1001)], None, {1001: 80}),  # no IPv6 on this host
        (None, [v6_row(0, 443, "0A", 2001)], {2001: 443}),
        ([], [], {}),
    ],
)
def test_missing_tables_are_ignored(
    proc_root: Path, tcp: list[str] | None, tcp6: list[str] | None, expected: dict[int, int]
) -> None:
    write_tables(proc_root, tcp=tcp, tcp6=tcp6)

    assert listening_inodes(proc_root) == expected


def test_no_net_directory(proc_root: Path) -> None:
    assert listening_inodes(proc_root) == {}
    assert existing_listeners(proc_root) == []


# --- socket_owners ---------------------------------------------------------------------


def test_socket_owners_reads_fd_symlinks(proc_root: Path) -> None:
    add_fds(proc_root, 100, {0: "/dev/null", 3: "socket:[1001]", 4: "socket:[5555]"})
    add_fds(proc_root, 200, {3: "socket:[2001]"})

    assert sorted(socket_owners({1001, 2001}, proc_root)) == [(1001, 100), (2001, 200)]


def test_socket_owners_ignores_what_is_not_a_socket(proc_root: Path) -> None:
    """pipe:[N] or anon_inode with the number of a listening inode is not that socket."""
    add_fds(
        proc_root,
        100,
        {
            0: "/dev/pts/0",
            1: "pipe:[1001]",
            2: "anon_inode:[eventpoll]",
            3: "/tmp/socket:[1001]",
            4: "net:[1001]",
            5: "/proc/100/fd/socket:[1001]",
        },
    )

    assert list(socket_owners({1001}, proc_root)) == []


def test_socket_owners_skips_entries_that_are_not_processes(proc_root: Path) -> None:
    """proc_root holds sys/, self and meminfo; a non-numeric directory with fds is skipped."""
    add_fds(proc_root, 100, {3: "socket:[1001]"})
    fake = proc_root / "thread-self" / "fd"
    fake.mkdir(parents=True)
    (fake / "3").symlink_to("socket:[1001]")

    assert list(socket_owners({1001}, proc_root)) == [(1001, 100)]


def test_socket_owners_skips_unreadable_fds(proc_root: Path) -> None:
    """A process without an fd directory (gone, or not ours), an fd that is not a link."""
    (proc_root / "100").mkdir()  # no fd/
    fd_dir = add_fds(proc_root, 200, {3: "socket:[1001]"})
    (fd_dir / "4").write_text("")  # readlink() fails: EINVAL
    (proc_root / "300").mkdir()
    (proc_root / "300" / "fd").write_text("")  # listdir() fails: ENOTDIR

    assert list(socket_owners({1001}, proc_root)) == [(1001, 200)]


def test_socket_owners_with_no_inodes(proc_root: Path) -> None:
    add_fds(proc_root, 100, {3: "socket:[1001]"})

    assert list(socket_owners(set(), proc_root)) == []


# --- existing_listeners ----------------------------------------------------------------


def test_existing_listeners(proc_root: Path) -> None:
    write_tables(
        proc_root,
        tcp=[
            v4_row(0, 8080, "0A", 1002),
            v4_row(1, 22, "0A", 1001),
            v4_row(2, 51234, "01", 1003),  # a connection, held open by 300
            v4_row(3, 9000, "0A", 1004),  # listening, but nobody holds it (e.g. other netns)
        ],
        tcp6=[v6_row(0, 443, "0A", 2001)],
    )
    add_fds(proc_root, 100, {3: "socket:[1001]"})
    add_fds(proc_root, 200, {5: "socket:[1002]", 6: "socket:[2001]"})
    add_fds(proc_root, 300, {3: "socket:[1003]"})

    assert existing_listeners(proc_root) == [  # sorted by port
        Listener(port=22, pid=100),
        Listener(port=443, pid=200),
        Listener(port=8080, pid=200),
    ]


def test_lowest_pid_wins_for_a_shared_listening_socket(proc_root: Path) -> None:
    """Pre-forked workers inherit the parent's socket: the parent has the lowest pid."""
    write_tables(proc_root, tcp=[v4_row(0, 80, "0A", 1001)], tcp6=None)
    for pid in (4711, 812, 4712, 4713):
        add_fds(proc_root, pid, {6: "socket:[1001]"})

    assert existing_listeners(proc_root) == [Listener(port=80, pid=812)]


def test_lowest_pid_wins_across_ipv4_and_ipv6_on_the_same_port(proc_root: Path) -> None:
    write_tables(proc_root, tcp=[v4_row(0, 80, "0A", 1001)], tcp6=[v6_row(0, 80, "0A", 2001)])
    add_fds(proc_root, 900, {3: "socket:[1001]"})
    add_fds(proc_root, 500, {4: "socket:[2001]"})

    assert existing_listeners(proc_root) == [Listener(port=80, pid=500)]


def test_same_socket_twice_in_one_process(proc_root: Path) -> None:
    write_tables(proc_root, tcp=[v4_row(0, 80, "0A", 1001)], tcp6=None)
    add_fds(proc_root, 100, {3: "socket:[1001]", 7: "socket:[1001]"})  # dup()

    assert existing_listeners(proc_root) == [Listener(port=80, pid=100)]


# --- in_cgroup -------------------------------------------------------------------------


@pytest.fixture
def cgroup_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cgroup2 mount in_cgroup resolves paths against (directories need not exist)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    monkeypatch.setattr(processes, "cgroup2_mount", lambda: root)
    return root


def write_cgroup(proc: Path, pid: int, text: str) -> None:
    base = proc / str(pid)
    base.mkdir()
    (base / "cgroup").write_text(text)


@pytest.mark.parametrize(
    ("line", "directory", "expected"),
    [
        ("0::/a", "a", True),  # the directory itself
        ("0::/a/b", "a", True),  # a child
        ("0::/a/b/c.scope", "a", True),  # deeper
        ("0::/ab", "a", False),  # a sibling with a common prefix
        ("0::/a", "ab", False),
        ("0::/a", "a/b", False),  # the parent is not inside its child
        ("0::/b", "a", False),
        ("0::/", "a", False),  # the root cgroup
        ("0::/", "", True),  # everything is below the mount itself
        ("0::/a/b", "", True),
    ],
)
def test_in_cgroup(
    proc_root: Path, cgroup_root: Path, line: str, directory: str, expected: bool
) -> None:
    write_cgroup(proc_root, 100, line + "\n")

    assert in_cgroup(100, cgroup_root / directory, proc_root) is expected


def test_in_cgroup_takes_the_v2_line_of_a_hybrid_host(proc_root: Path, cgroup_root: Path) -> None:
    write_cgroup(proc_root, 100, "12:pids:/b\n11:memory:/b\n1:name=systemd:/b\n0::/a/x\n")

    assert in_cgroup(100, cgroup_root / "a", proc_root) is True
    assert in_cgroup(100, cgroup_root / "b", proc_root) is False


def test_in_cgroup_missing_file(proc_root: Path, cgroup_root: Path) -> None:
    (proc_root / "100").mkdir()  # process directory without cgroup

    assert in_cgroup(100, cgroup_root / "a", proc_root) is False
    assert in_cgroup(31337, cgroup_root / "a", proc_root) is False  # no such process


def test_in_cgroup_without_a_v2_line(proc_root: Path, cgroup_root: Path) -> None:
    """cgroup v1 only: there is no 0:: line to compare."""
    write_cgroup(proc_root, 100, "12:pids:/a\n1:name=systemd:/a\n")

    assert in_cgroup(100, cgroup_root / "a", proc_root) is False


def test_in_cgroup_without_a_cgroup2_mount(
    proc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "cgroup2_mount", lambda: None)
    write_cgroup(proc_root, 100, "0::/a\n")

    assert in_cgroup(100, tmp_path / "a", proc_root) is False


def test_in_cgroup_resolves_the_directory(proc_root: Path, cgroup_root: Path) -> None:
    """The directory may be given with .. or through a symlink."""
    (cgroup_root / "a").mkdir()
    link = cgroup_root.parent / "link-to-a"
    link.symlink_to(cgroup_root / "a")
    write_cgroup(proc_root, 100, "0::/a/b\n")

    assert in_cgroup(100, link, proc_root) is True
    assert in_cgroup(100, cgroup_root / "x" / ".." / "a", proc_root) is True
