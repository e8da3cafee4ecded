"""What the e2e tests drive: a test cgroup, the peer processes and the sensor itself.

Rules followed (docs: /work/shared/DESIGN.md, "Rules for tests on shared machines"):
traffic only on loopback; the sensor is always scoped to a cgroup the test made or a pid
it started; every wait is bounded; only processes the test started are stopped, by pid;
cgroups the test made are removed even when it fails.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from flowtap.loader import kernel

Record = dict[str, Any]
Message = dict[str, Any]
T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
PEER = Path(__file__).resolve().with_name("peer.py")
TLS_PEER = Path(__file__).resolve().with_name("tls_peer.py")
OPENSSL = "/usr/bin/openssl"
BPF_OBJECT = REPO / "src" / "flowtap" / "bpf" / "conn.bpf.o"
SCHEMA = REPO / "docs" / "schema" / "connection.schema.json"
HTTP_SCHEMA = REPO / "docs" / "schema" / "http.schema.json"
CURL = "/usr/bin/curl"
BPFTOOL = "/usr/sbin/bpftool"
PYTHON = sys.executable

# On a slower machine (a guest of the kernel matrix, under qemu's emulation: tests/kernels)
# $FLOWTAP_TEST_TIMEOUT_SCALE multiplies every bound.
TIMEOUT_SCALE = float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))
READY_TIMEOUT_S = 20.0 * TIMEOUT_SCALE
STOP_TIMEOUT_S = 20.0 * TIMEOUT_SCALE
RECORD_TIMEOUT_S = 10.0 * TIMEOUT_SCALE
PEER_TIMEOUT_S = 20.0 * TIMEOUT_SCALE
# Clients started after the sensor talk at once: the exec hold (default 300 ms) gets a
# generous bound here, as this machine is shared and the kernel matrix's guests are slow
# (reading a Go binary's pclntab took 9.1 s in a 5.10 guest under qemu's emulation, with
# a second guest beside it). A bound, not a wait: on this machine the hold lasts ~0.1 s.
EXEC_HOLD = ["--exec-hold-ms", str(int(4000 * TIMEOUT_SCALE))]


def with_private_tmp(argv: Sequence[str]) -> list[str]:
    """argv in a mount namespace of its own with an empty tmpfs on /tmp, as a container's
    /tmp is. The checkout stays reachable at its path when it lies under /tmp (a clone
    there, as CI may make): it is bound to /mnt first, then back over the new /tmp."""
    script = 'mount -t tmpfs flowtap-test /tmp && exec "$@"'
    if REPO.is_relative_to("/tmp"):
        script = (
            'mount --bind "$0" /mnt && mount -t tmpfs flowtap-test /tmp && mkdir -p "$0" '
            '&& mount --bind /mnt "$0" && exec "$@"'
        )
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(REPO), *argv]


def flowtap_command() -> str:
    """The venv's flowtap, next to the interpreter running the tests (or the repo's venv)."""
    beside = Path(sys.executable).with_name("flowtap")
    return str(beside if beside.exists() else REPO / ".venv" / "bin" / "flowtap")


def child_env() -> dict[str, str]:
    """The environment for every child: no proxy settings, so curl talks to loopback."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    describe: Callable[[], str] = lambda: "",
) -> T:
    """Polls `probe` until it returns something other than None/False; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            details = describe()
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{details}")
        time.sleep(interval)


# --- cgroup ---------------------------------------------------------------------------


def cgroup2_mount() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1].replace("\\040", " "))
    raise RuntimeError("no cgroup2 filesystem in /proc/self/mounts")


class Cgroup:
    """A cgroup v2 directory made by the test (flowtap-test-<random>), and its children."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: Path) -> Cgroup:
        path = parent / f"flowtap-test-{secrets.token_hex(6)}"
        path.mkdir()
        return cls(path)

    def child(self, name: str) -> Cgroup:
        path = self.path / name
        path.mkdir()
        return Cgroup(path)

    def preexec(self) -> Callable[[], None]:
        """For Popen(preexec_fn=...): the new process joins the cgroup before it execs."""
        procs = os.fsencode(self.path / "cgroup.procs")

        def join() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0": the writing process itself
            finally:
                os.close(fd)

        return join

    def members(self) -> list[int]:
        """Pids in this cgroup and every cgroup below it."""
        pids: list[int] = []
        for directory, _subdirs, _files in os.walk(self.path):
            with contextlib.suppress(OSError):
                text = (Path(directory) / "cgroup.procs").read_text()
                pids += [int(pid) for pid in text.split()]
        return pids

    def remove(self, timeout: float = 10.0) -> None:
        """Kills what is left inside (only processes the test started live here), then
        removes the cgroups bottom-up; bounded retries while the kernel lets go of them."""
        deadline = time.monotonic() + timeout
        while self.path.exists():
            for pid in self.members():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for directory, _subdirs, _files in sorted(
                os.walk(self.path), key=lambda item: -len(Path(item[0]).parts)
            ):
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.rmdir(directory)
            if not self.path.exists():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not remove {self.path}: {self.members()} remain")
            time.sleep(0.05)


# The attach types of the egress controller's programs (bpf/egress.bpf.c).
EGRESS_ATTACH_TYPES = {
    "connect4": kernel.BPF_CGROUP_INET4_CONNECT,
    "connect6": kernel.BPF_CGROUP_INET6_CONNECT,
    "sockops": kernel.BPF_CGROUP_SOCK_OPS,
    "getsockopt": kernel.BPF_CGROUP_GETSOCKOPT,
}


def cgroup_programs(cgroup: Path) -> dict[str, int]:
    """How many programs of each egress attach type the kernel says hang on a cgroup
    (asked with BPF_PROG_QUERY: bpftool 7.1 lists none on 5.10). Empty when none do."""
    counts = {
        name: kernel.attached_programs(str(cgroup), attach_type)
        for name, attach_type in EGRESS_ATTACH_TYPES.items()
    }
    return {name: count for name, count in counts.items() if count}


# --- processes -----------------------------------------------------------------------


class Peer:
    """A process started by the test; its stdout JSON lines are read as they come."""

    def __init__(self, argv: Sequence[str], popen: subprocess.Popen[bytes], log: Path) -> None:
        self.argv = list(argv)
        self.popen = popen
        self.log = log
        self.pid = popen.pid
        self.exe = self._exe()
        self._messages: list[Message] = []
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        if popen.stdout is not None:
            self._reader = threading.Thread(target=self._read, args=(popen.stdout,), daemon=True)
            self._reader.start()

    def _exe(self) -> str | None:
        try:
            return os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return None

    def _read(self, stream: IO[bytes]) -> None:
        """Collects stdout lines until EOF (every holder of the pipe has exited)."""
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                with self._cond:
                    self._lines.append(line)
                    with contextlib.suppress(ValueError):
                        message = json.loads(line)
                        if isinstance(message, dict):
                            self._messages.append(message)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def messages(self, event: str) -> list[Message]:
        with self._cond:
            return [m for m in self._messages if m.get("event") == event]

    def lines(self) -> list[str]:
        """Every stdout line so far, JSON or not."""
        with self._cond:
            return list(self._lines)

    def wait_message(
        self, event: str, timeout: float = PEER_TIMEOUT_S, *, pid: int | None = None
    ) -> Message:
        """The first status line `event` from this process (or from `pid`, a child that
        shares its stdout); bounded wait."""
        pid = self.pid if pid is None else pid
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self._messages:
                    if message.get("event") == event and message.get("pid") == pid:
                        return message
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader_alive()):
                    break
                self._cond.wait(min(left, 0.1))
        raise AssertionError(
            f"{self.argv[:3]} (pid {self.pid}) never said {event!r}; "
            f"exit code {self.popen.poll()}; output {self._lines}; stderr {self.stderr()}"
        )

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def wait(self, timeout: float = PEER_TIMEOUT_S) -> int:
        """Waits for the process to exit (bounded) and returns its exit code."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} {self.argv[:3]} did not exit") from None
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def finish(self, timeout: float = PEER_TIMEOUT_S) -> None:
        """Waits for a successful exit."""
        code = self.wait(timeout)
        assert code == 0, f"pid {self.pid} {self.argv} exited {code}: {self.stderr()}"

    def kill(self) -> None:
        """SIGKILL this process (by its pid, only if it is still ours to reap)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


@dataclass
class Server:
    peer: Peer
    host: str
    port: int

    @property
    def pid(self) -> int:
        return self.peer.pid


# --- the sensor ----------------------------------------------------------------------


def connections(records: list[Record]) -> dict[int, list[Record]]:
    """Records grouped by connection id, in output order."""
    grouped: dict[int, list[Record]] = {}
    for record in records:
        if record.get("type") == "connection":
            grouped.setdefault(record["connection_id"], []).append(record)
    return grouped


def matches(record: Record, criteria: dict[str, Any]) -> bool:
    """Criteria: pid, tid, direction, family, local_port, remote_port, local_ip, remote_ip,
    event (of the record given)."""
    view = {
        "pid": record["process"]["pid"],
        "tid": record["process"]["tid"],
        "direction": record["direction"],
        "family": record["family"],
        "local_port": record["local"]["port"],
        "remote_port": record["remote"]["port"],
        "local_ip": record["local"]["ip"],
        "remote_ip": record["remote"]["ip"],
        "event": record["event"],
    }
    unknown = set(criteria) - set(view)
    if unknown:
        raise KeyError(f"unknown criteria {sorted(unknown)}")
    return all(view[key] == value for key, value in criteria.items())


def find_pairs(records: list[Record], **criteria: Any) -> list[tuple[Record, Record | None]]:
    """(open, close or None) for every connection whose open record matches."""
    found: list[tuple[Record, Record | None]] = []
    for group in connections(records).values():
        opens = [r for r in group if r["event"] == "open"]
        closes = [r for r in group if r["event"] == "close"]
        if opens and matches(opens[0], criteria):
            found.append((opens[0], closes[0] if closes else None))
    return found


def only_pair(records: list[Record], **criteria: Any) -> tuple[Record, Record]:
    """The open and close records of the one connection matching criteria."""
    pairs = find_pairs(records, **criteria)
    assert len(pairs) == 1, f"expected one connection with {criteria}, got {pairs}"
    opened, closed = pairs[0]
    assert closed is not None, f"no close record for {opened}"
    return opened, closed


def connection_id(records: list[Record], **criteria: Any) -> int:
    """The connection_id of the one open/close pair matching criteria (only_pair)."""
    opened, _closed = only_pair(records, **criteria)
    conn_id: int = opened["connection_id"]
    return conn_id


def _validator(schema: Path) -> Draft202012Validator:
    """A validator for one of docs/schema/, which may refer to the others by their $id."""
    registry: Registry[Any] = Registry().with_resources(
        (document["$id"], Resource.from_contents(document))
        for document in (json.loads(path.read_text()) for path in (SCHEMA, HTTP_SCHEMA))
    )
    return Draft202012Validator(json.loads(schema.read_text()), registry=registry)


def schema_errors(records: list[Record]) -> list[str]:
    """Violations of docs/schema/: connection.schema.json or http.schema.json by type."""
    validators = {"connection": _validator(SCHEMA), "http": _validator(HTTP_SCHEMA)}
    errors: list[str] = []
    for record in records:
        validator = validators.get(record.get("type", ""))
        if validator is None:
            errors.append(f"record of unknown type: {record}")
            continue
        errors += [
            f"{record['type']} record of connection {record.get('connection_id')}: {e.message}"
            for e in validator.iter_errors(record)
        ]
    return errors


def assert_well_formed(records: list[Record]) -> None:
    """Per connection: exactly one open, then at most one close repeating its fields; and
    every record valid against the documented JSON schema."""
    for conn_id, group in connections(records).items():
        events = [r["event"] for r in group]
        assert events in (["open"], ["open", "close"]), f"connection {conn_id}: {events}"
        if len(group) == 2:
            opened, closed = group
            for key in ("process", "family", "socket_protocol", "direction", "remote"):
                assert closed[key] == opened[key], f"connection {conn_id}: {key} differs"
            assert closed["timestamp"] >= opened["timestamp"], f"connection {conn_id}"
    errors = schema_errors(records)
    assert not errors, "\n".join(errors)


def assert_no_drops(stats: dict[str, Any]) -> None:
    drops = stats["drops"]
    assert drops, stats
    assert {name: n for name, n in drops.items() if n} == {}, stats


class Sensor:
    """`flowtap run` as a subprocess, writing JSON records to a file the test polls."""

    def __init__(
        self,
        workdir: Path,
        scope: Sequence[str],
        extra: Sequence[str] = (),
        cgroup: Cgroup | None = None,
    ) -> None:
        if "--cgroup" not in scope and "--pid" not in scope:
            raise ValueError("scope the sensor with --cgroup or --pid (shared machine)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.output = workdir / "records.jsonl"
        self.ready = workdir / "ready"
        self.stats_file = workdir / "stats.json"
        self.log = workdir / "stderr.log"
        self.argv = [
            flowtap_command(),
            "run",
            "--output",
            "json",
            "--output-file",
            str(self.output),
            "--ready-file",
            str(self.ready),
            "--stats-file",
            str(self.stats_file),
            "-v",
            *scope,
            *extra,
        ]
        if "--state-dir" not in extra:  # never the host's /var/lib/flowtap in tests
            self.argv += ["--state-dir", str(workdir / "state")]
        if "--exec-gate-path" not in extra:
            # The exec gate marks the root filesystem only (where the tests' programs
            # are), not every filesystem of this shared machine.
            self.argv += ["--exec-gate-path", "/"]
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                preexec_fn=cgroup.preexec() if cgroup else None,
            )
        self.pid = self.popen.pid
        self.stats: dict[str, Any] | None = None

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        def ready() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"flowtap exited {self.popen.returncode} before it was ready:\n" + self.stderr()
                )
            return self.ready.exists() and self.ready.read_text().strip() == str(self.pid)

        wait_until(ready, timeout, "the sensor's ready file", interval=0.05, describe=self.stderr)

    def all_records(self) -> list[Record]:
        """Every complete JSON line written so far."""
        try:
            text = self.output.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]  # the last piece is empty or an unfinished line
        return [json.loads(line) for line in lines if line]

    def records(self) -> list[Record]:
        """The connection records written so far."""
        return [r for r in self.all_records() if r.get("type") == "connection"]

    def http_records(self) -> list[Record]:
        """The HTTP transaction records written so far."""
        return [r for r in self.all_records() if r.get("type") == "http"]

    def describe(self) -> str:
        records = "\n".join(json.dumps(r) for r in self.all_records()) or "(no records)"
        return f"records:\n{records}\nsensor log:\n{self.stderr()}"

    def wait_for(
        self,
        predicate: Callable[[list[Record]], T | None],
        timeout: float = RECORD_TIMEOUT_S,
        what: str = "a record",
    ) -> T:
        """Polls the output file until predicate(records) is truthy; returns its value."""

        def probe() -> T | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"flowtap exited {self.popen.returncode}\n{self.describe()}")
            return predicate(self.records())

        return wait_until(probe, timeout, what, interval=0.05, describe=self.describe)

    def wait_for_closed(self, timeout: float = RECORD_TIMEOUT_S, **criteria: Any) -> Record:
        """The close record of the connection whose open record matches criteria."""

        def closed(records: list[Record]) -> Record | None:
            for _opened, close in find_pairs(records, **criteria):
                if close is not None:
                    return close
            return None

        return self.wait_for(closed, timeout, f"a closed connection with {criteria}")

    def wait_log(self, text: str, timeout: float = RECORD_TIMEOUT_S) -> None:
        """Waits until the sensor's log contains text."""

        def logged() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"flowtap exited {self.popen.returncode}\n{self.stderr()}")
            return text in self.log.read_text(errors="replace")

        wait_until(logged, timeout, f"{text!r} in the sensor's log", describe=self.stderr)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        """SIGINT, bounded wait, exit code 0; returns the stats file's JSON."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGINT)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"flowtap ignored SIGINT for {timeout} s\n{self.stderr()}"
            ) from None
        assert code == 0, f"flowtap exited {code}\n{self.stderr()}"
        stats: dict[str, Any] = json.loads(self.stats_file.read_text())
        self.stats = stats
        return stats

    def finish(self, timeout: float = STOP_TIMEOUT_S) -> list[Record]:
        """stop(), then every record: well formed, schema-valid, and nothing dropped."""
        stats = self.stop(timeout)
        records = self.records()
        assert_well_formed(records)
        errors = schema_errors(self.http_records())
        assert not errors, "\n".join(errors)
        assert_no_drops(stats)
        return records

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def bpf_prog_ids(self) -> set[int]:
        """Ids of the BPF programs this sensor holds (prog and link fds), from fdinfo."""
        ids: set[int] = set()
        fdinfo = Path(f"/proc/{self.pid}/fdinfo")
        for entry in fdinfo.iterdir():
            with contextlib.suppress(OSError):
                for line in entry.read_text().splitlines():
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        return ids


def body(message: dict[str, Any]) -> bytes | None:
    """The decoded body of an http record's request or response (None when absent)."""
    text = message.get("body")
    return None if text is None else base64.b64decode(text)


def http_of(sensor: Sensor, pid: int, count: int) -> list[Record]:
    """The first `count` http records of pid, once there are that many (bounded wait)."""

    def enough(_records: list[Record]) -> list[Record] | None:
        mine = [r for r in sensor.http_records() if r["process"]["pid"] == pid]
        return mine if len(mine) >= count else None

    return sensor.wait_for(enough, what=f"{count} http records of pid {pid}")[:count]


# --- the lab: everything one test starts, stopped at its end -----------------------------


@dataclass
class Lab:
    """Starts peers, curl and sensors for one test, and stops them all at its end."""

    workdir: Path
    cgroup: Cgroup
    peers: list[Peer] = field(default_factory=list)
    sensors: list[Sensor] = field(default_factory=list)
    _count: int = 0

    def _name(self, stem: str) -> Path:
        self._count += 1
        return self.workdir / f"{self._count:02d}-{stem}"

    def file(self, stem: str) -> Path:
        """A path for a go/hold file (not created)."""
        return self._name(stem)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cgroup: Cgroup | None,
        stem: str,
        env: dict[str, str] | None = None,
    ) -> Peer:
        """Starts argv (in `cgroup`, joined before exec, when given), with env added."""
        log = self._name(stem + ".stderr")
        with log.open("wb") as stderr:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**child_env(), **(env or {})},
                preexec_fn=cgroup.preexec() if cgroup is not None else None,
            )
        peer = Peer(argv, popen, log)
        self.peers.append(peer)
        return peer

    def in_cgroup(self, cgroup: Cgroup | bool) -> Cgroup | None:
        """True: the test cgroup; False: where the test runs (outside it); or that one."""
        if isinstance(cgroup, Cgroup):
            return cgroup
        return self.cgroup if cgroup else None

    def server(
        self,
        *,
        host: str = "127.0.0.1",
        mode: str = "raw",
        read: int = 0,
        reply: int = 0,
        connections: int = 1,
        cgroup: Cgroup | bool = True,
        extra: Sequence[str] = (),
    ) -> Server:
        argv = [PYTHON, str(PEER), "server", "--host", host, "--mode", mode]
        argv += ["--read", str(read), "--reply", str(reply), "--connections", str(connections)]
        argv += extra
        peer = self.spawn(argv, cgroup=self.in_cgroup(cgroup), stem="server")
        port = int(peer.wait_message("listening")["port"])
        return Server(peer, host, port)

    def client(
        self,
        server: Server | None = None,
        *,
        port: int | None = None,
        host: str | None = None,
        how: str = "sendall",
        send: int = 0,
        expect: int = 0,
        go: Path | None = None,
        hold: Path | None = None,
        half_close: Path | None = None,
        cgroup: Cgroup | bool = True,
        extra: Sequence[str] = (),
    ) -> Peer:
        port = port if port is not None else (server.port if server else None)
        host = host or (server.host if server else "127.0.0.1")
        assert port is not None
        argv = [PYTHON, str(PEER), "client", "--host", host, "--port", str(port)]
        argv += ["--how", how, "--send", str(send), "--expect", str(expect)]
        for flag, path in (("--go", go), ("--hold", hold), ("--half-close", half_close)):
            if path is not None:
                argv += [flag, str(path)]
        argv += extra
        return self.spawn(argv, cgroup=self.in_cgroup(cgroup), stem="client")

    def curl(self, url: str, *, cgroup: Cgroup | bool = True) -> Peer:
        argv = [CURL, "-sS", "--noproxy", "*", "--max-time", "10", "-o", "/dev/null", url]
        return self.spawn(argv, cgroup=self.in_cgroup(cgroup), stem="curl")

    def sensor(
        self,
        *scope: str,
        include_loopback: bool = True,
        extra: Sequence[str] = (),
        wait: bool = True,
        cgroup: Cgroup | None = None,
    ) -> Sensor:
        """Starts `flowtap run` scoped by `scope` (default: the test cgroup), itself in
        `cgroup` when given."""
        scope = scope or ("--cgroup", str(self.cgroup.path))
        flags = ["--include-loopback"] if include_loopback else []
        sensor = Sensor(self._name("sensor"), scope, [*flags, *extra], cgroup)
        self.sensors.append(sensor)
        if wait:
            sensor.wait_ready()
        return sensor

    def close(self) -> None:
        """Teardown: sensors first (SIGINT, then SIGKILL), then every peer still running."""
        for sensor in self.sensors:
            if sensor.popen.poll() is None:
                with contextlib.suppress(AssertionError):
                    sensor.stop()
            sensor.kill()
        for peer in self.peers:
            peer.kill()


@contextlib.contextmanager
def lab(workdir: Path, cgroup: Cgroup) -> Iterator[Lab]:
    the_lab = Lab(workdir, cgroup)
    try:
        yield the_lab
    finally:
        the_lab.close()


def bpftool_programs() -> list[dict[str, Any]]:
    out = subprocess.run(
        [BPFTOOL, "-j", "prog", "show"], capture_output=True, check=True, timeout=20
    ).stdout
    programs: list[dict[str, Any]] = json.loads(out or b"[]")
    return programs


def flowtap_cli(
    *args: str, user: int | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Runs the flowtap command to completion (as `user` via setpriv when given)."""
    argv = [flowtap_command(), *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


# --- TLS ------------------------------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=30)


def make_pki(d: Path) -> dict[str, Path]:
    """A CA in d, and a certificate it signs for 127.0.0.1: {"ca", "cert", "key"}."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
            "-days", "2", "-subj", "/CN=flowtap test CA")  # fmt: skip
    openssl("req", *ec, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"))  # fmt: skip
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


def start_server(e2e: Lab, pki: dict[str, Path]) -> tuple[Peer, int]:
    """tls_peer.py's HTTPS server (HTTP/2 and HTTP/1.1), in the test cgroup."""
    argv = [PYTHON, str(TLS_PEER), "server", "--cert", str(pki["cert"]), "--key", str(pki["key"])]
    server = e2e.spawn(argv, cgroup=e2e.cgroup, stem="https-server")
    return server, int(server.wait_message("listening")["port"])
