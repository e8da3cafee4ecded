"""HotSpot's dynamic attach protocol on Linux: loading a Java agent into a running JVM
without any JDK tool.

1. The JVM listens on <its /tmp>/.java_pid<nspid> once its attach listener runs. If it does
   not, a file .attach_pid<nspid> (owned by the JVM's euid) in its cwd or /tmp and a
   SIGQUIT make it start the listener. SIGQUIT is sent only when the JVM has its handler
   installed (SigCgt): before that, or with -Xrs, SIGQUIT kills it.
2. The request, protocol 1: "1\\0load\\0instrument\\0false\\0<jar>=<options>\\0"; the reply
   is a status line (0: done) and, for load, the agent's return code.

Everything goes through descriptors of the target's root and /tmp (opened without following
a symbolic link: a container's root is not ours to trust), the socket found there must be
the JVM's (SO_PEERCRED: its pid and uid), and every step has one deadline. HotSpot accepts
a peer of its own euid/egid, or root (JDK 9 on); when our root is not root in the JVM's
user namespace (or for JDK 8), the connect is done by a child process with the JVM's
euid/egid (`python -m flowtap.java.attach`: no fork of the multithreaded sensor).

Only AttachError leaves this module; its reason says what the user can do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .jvm import Jvm, attach_supported, catches_sigquit

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AttachError",
    "load_agent",
    "parse_load_reply",
    "request",
    "target_tmp",
]

DEFAULT_TIMEOUT_S = 10.0
_REPLY_MAX = 1 << 20  # a reply is a few lines; a peer sending more is not HotSpot
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.05  # bounded backoff: ~20 looks a second at most
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_CHILD_ARG = "--connect"
# What the instrument agent's Agent_OnAttach returns (the JDK's InvocationAdapter.c).
_INSTRUMENT_ERRORS = {
    100: "the agent jar cannot be opened by the JVM, or its manifest has no Agent-Class",
    101: "the JVM could not add the agent jar to its class path",
    102: "the agent's agentmain is missing or threw (see the JVM's stderr)",
}
# java launcher options that take the next argument as their value (their value is not the
# main class, after which options are the program's, not the JVM's).
_VALUE_OPTIONS = {
    "-cp",
    "-classpath",
    "--class-path",
    "-p",
    "--module-path",
    "--upgrade-module-path",
    "--add-modules",
    "--limit-modules",
    "--add-exports",
    "--add-opens",
    "--add-reads",
    "--patch-module",
    "--enable-native-access",
}


class AttachError(Exception):
    """The agent was not loaded; `reason` says why and what to do about it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True)
class _Peer:
    pid: int
    uid: int
    gid: int


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.end = time.monotonic() + timeout
        self.timeout = timeout

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


# --- the request ------------------------------------------------------------------------


def _encode(command: str, args: Sequence[str]) -> bytes:
    """Protocol 1: version, command and exactly three arguments, each NUL-terminated."""
    fields = ["1", command, *args, *[""] * (3 - len(args))]
    if len(fields) != 5 or any("\0" in field for field in fields):
        raise AttachError(f"bad attach request {command!r} {list(args)!r}")
    return b"".join(field.encode() + b"\0" for field in fields)


def _exchange(sock: socket.socket, payload: bytes, deadline: _Deadline, what: str) -> bytes:
    """Sends the request and reads the reply until the JVM closes the connection."""
    chunks: list[bytes] = []
    try:
        sock.settimeout(max(deadline.left(), 0.001))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)  # a peer that closed may still have left its answer
        size = 0
        while True:
            sock.settimeout(max(deadline.left(), 0.001))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # closed without reading all we sent
                chunk = b""
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > _REPLY_MAX:
                raise AttachError(f"{what} sent more than {_REPLY_MAX} bytes: not a HotSpot JVM")
    except TimeoutError as exc:
        raise AttachError(
            f"timed out after {deadline.timeout:g} s waiting for {what} to answer "
            "(a JVM busy in a long pause, or not a HotSpot attach listener)"
        ) from exc
    except OSError as exc:
        raise AttachError(f"talking to {what} failed: {exc.strerror or exc}") from exc


def _peer(sock: socket.socket) -> _Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return _Peer(pid, uid, gid)


def request(
    path: str,
    command: str,
    args: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    expect_uid: int | None = None,
    expect_pid: int | None = None,
) -> bytes:
    """Sends one attach command to the listener at path and returns its whole reply.
    The listener must have been created by expect_pid/expect_uid (SO_PEERCRED) when given."""
    deadline = _Deadline(timeout)
    payload = _encode(command, args)
    sock = _connect(path, deadline)
    if sock is None:
        raise AttachError(f"nothing listens on {path}")
    with sock:
        _check_peer(_peer(sock), expect_pid, expect_uid, path)
        return _exchange(sock, payload, deadline, path)


def _connect(path: str, deadline: _Deadline) -> socket.socket | None:
    """A connected socket, or None when nothing listens there (no file, refused)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(max(deadline.left(), 0.001))
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except TimeoutError as exc:
        sock.close()
        raise AttachError(f"timed out connecting to {path} (its backlog is full)") from exc
    except OSError as exc:
        sock.close()
        raise AttachError(f"cannot connect to {path}: {exc.strerror or exc}") from exc
    return sock


def _check_peer(peer: _Peer, pid: int | None, uid: int | None, path: str) -> None:
    if (uid is not None and peer.uid != uid) or (pid is not None and peer.pid != pid):
        raise AttachError(
            f"{path} was made by pid {peer.pid} uid {peer.uid}, not by the JVM (pid {pid}, "
            f"uid {uid}): someone else's socket; not attaching through it"
        )


def parse_load_reply(reply: bytes) -> None:
    """Checks a reply to `load`: status line 0, then the agent's return code 0 (JDK 9-16:
    "0"; JDK 17 on: "return code: 0"; anything else there is the JVM's message)."""
    if not reply:
        raise AttachError(
            "the JVM closed the connection without answering: it does not accept our uid "
            "(HotSpot takes its own euid/egid, or root from JDK 9 on), or it is not HotSpot"
        )
    text = reply.decode("utf-8", errors="replace")
    status_line, _, rest = text.partition("\n")
    try:
        status = int(status_line.strip())
    except ValueError:
        raise AttachError(f"not a HotSpot attach reply: {text[:80]!r}") from None
    if status != 0:
        message = rest.strip() or f"status {status}"
        raise AttachError(f"the JVM refused to load the agent: {message}")
    result_line, _, more = rest.partition("\n")
    result = result_line.strip().removeprefix("return code:").strip()
    if not result:
        raise AttachError("the JVM answered 0 but gave no result for the agent (truncated reply)")
    try:
        code = int(result)
    except ValueError:
        detail = (result_line + "\n" + more).strip()
        raise AttachError(f"the JVM could not load the agent: {detail}") from None
    if code != 0:
        detail = more.strip() or _INSTRUMENT_ERRORS.get(code, "see the JVM's stderr")
        raise AttachError(f"the agent failed to start in the JVM (return code {code}): {detail}")


# --- the target's files -----------------------------------------------------------------


@contextlib.contextmanager
def _opened_dir(path: str, *, dir_fd: int | None = None, follow: bool = True) -> Iterator[int]:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def target_tmp(jvm: Jvm) -> Iterator[int]:
    """A descriptor of the JVM's /tmp (HotSpot's fixed temp directory on Linux). Its root is
    followed (the kernel's link); tmp in it must be a directory, not a link."""
    try:
        with (
            _opened_dir(jvm.root) as root,
            _opened_dir("tmp", dir_fd=root, follow=False) as tmp,
        ):
            yield tmp
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AttachError(
                f"/tmp in the root of pid {jvm.pid} is a symbolic link; not following it"
            ) from exc
        raise AttachError(f"cannot open /tmp of pid {jvm.pid}: {exc.strerror or exc}") from exc


def _socket_name(jvm: Jvm) -> str:
    return f".java_pid{jvm.nspid}"


def _socket_ready(tmp: int, jvm: Jvm) -> bool:
    """Whether the JVM's socket file is there: a socket owned by the JVM's uid."""
    try:
        st = os.stat(_socket_name(jvm), dir_fd=tmp, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == jvm.uid


@dataclass
class _Trigger:
    dir_fd: int
    name: str
    ino: int
    dev: int
    ours: bool

    def remove(self) -> None:
        """Removes the trigger if it is still the file we made (not one swapped in)."""
        if not self.ours:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            if (st.st_ino, st.st_dev) == (self.ino, self.dev):
                os.unlink(self.name, dir_fd=self.dir_fd)


def _make_trigger(dir_fd: int, jvm: Jvm) -> _Trigger:
    """.attach_pid<nspid>, 0600, owned by the JVM's euid/egid (HotSpot ignores a trigger
    owned by anyone else but root, and our root may not be root in its namespace)."""
    name = f".attach_pid{jvm.nspid}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        # One already there still triggers if it is a file of the JVM's user; leave it.
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_uid in (jvm.uid, 0):
            return _Trigger(dir_fd, name, st.st_ino, st.st_dev, ours=False)
        raise
    try:
        os.fchown(fd, jvm.uid, jvm.gid)
        os.fchmod(fd, 0o600)
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)
    return _Trigger(dir_fd, name, st.st_ino, st.st_dev, ours=True)


@contextlib.contextmanager
def _trigger(jvm: Jvm, tmp: int) -> Iterator[None]:
    """The trigger file, in the JVM's cwd (as the JDK's tools do) or else its /tmp."""
    cwd: int | None = None
    made: _Trigger | None = None
    try:
        with contextlib.suppress(OSError):
            cwd = os.open(f"/proc/{jvm.pid}/cwd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if cwd is not None:
            with contextlib.suppress(OSError):
                made = _make_trigger(cwd, jvm)
        if made is None:
            try:
                made = _make_trigger(tmp, jvm)
            except OSError as exc:
                raise AttachError(
                    f"cannot create .attach_pid{jvm.nspid} in the cwd or /tmp of pid "
                    f"{jvm.pid}: {exc.strerror or exc}"
                ) from exc
        yield
    finally:
        if made is not None:
            made.remove()
        if cwd is not None:
            os.close(cwd)


# --- flags ----------------------------------------------------------------------------


def _jvm_options(pid: int) -> list[str]:
    """The JVM options of a process, in the order HotSpot applies them (the last wins):
    JAVA_TOOL_OPTIONS, JDK_JAVA_OPTIONS, the command line's, _JAVA_OPTIONS."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(1 << 20).decode(errors="replace").split("\0")
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read(1 << 20).decode(errors="replace").split("\0")
    except OSError:
        return []
    env = dict(item.partition("=")[::2] for item in environ if "=" in item)
    options = env.get("JAVA_TOOL_OPTIONS", "").split() + env.get("JDK_JAVA_OPTIONS", "").split()
    take_value = False
    for arg in argv[1:]:
        if take_value:
            take_value = False
            continue
        if arg in ("-jar", "-m", "--module") or not arg.startswith("-"):
            break  # the program's arguments follow
        options.append(arg)
        take_value = arg in _VALUE_OPTIONS
    return options + env.get("_JAVA_OPTIONS", "").split()


def _flag(options: list[str], name: str) -> bool | None:
    value: bool | None = None
    for option in options:
        if option in (f"-XX:+{name}", f"-XX:-{name}"):
            value = option[4] == "+"
    return value


def _no_signals(options: list[str]) -> bool:
    return "-Xrs" in options or _flag(options, "ReduceSignalUsage") is True


# --- attaching ----------------------------------------------------------------------------


def _root_is_root_in(jvm: Jvm) -> bool:
    """Whether our euid shows as 0 inside the JVM's user namespace (HotSpot's is_root)."""
    try:
        with open(f"/proc/{jvm.pid}/uid_map") as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return False
    me = os.geteuid()
    for line in lines:
        try:
            inside, outside, count = (int(x) for x in line.split())
        except ValueError:
            continue
        if outside <= me < outside + count:
            return inside + (me - outside) == 0
    return False


def _needs_child(jvm: Jvm) -> bool:
    """Whether HotSpot would refuse us as we are, so the JVM's own user must connect."""
    if (os.geteuid(), os.getegid()) == (jvm.uid, jvm.gid):
        return False
    major = jvm.major
    if major is not None and major < 9:
        return True  # JDK 8 takes exactly its own euid/egid, not root
    return not _root_is_root_in(jvm)


def _wait_for_socket(jvm: Jvm, tmp: int, deadline: _Deadline, path: str) -> socket.socket:
    """Triggers the attach listener and polls (bounded backoff) until it listens."""
    sleep = _POLL_FIRST_S
    signalled = False
    with _trigger(jvm, tmp):
        while True:
            if not signalled and catches_sigquit(jvm.pid):
                try:
                    _signal(jvm)
                except ProcessLookupError:
                    raise AttachError(f"the JVM (pid {jvm.pid}) exited") from None
                signalled = True
            if signalled and _socket_ready(tmp, jvm):
                sock = _connect(path, deadline)
                if sock is not None:
                    return sock
            if not os.path.exists(f"/proc/{jvm.pid}"):
                raise AttachError(f"the JVM (pid {jvm.pid}) exited")
            if deadline.expired():
                break
            time.sleep(min(sleep, deadline.left()))
            sleep = min(sleep * 2, _POLL_MAX_S)
    if not signalled:
        raise AttachError(
            f"the JVM (pid {jvm.pid}) is not ready: it has no SIGQUIT handler after "
            f"{deadline.timeout:g} s (still starting, or it runs with -Xrs or "
            "-XX:+ReduceSignalUsage); not signalling it, as SIGQUIT would kill it"
        )
    raise AttachError(
        f"the JVM (pid {jvm.pid}) did not open its attach socket /tmp/.java_pid{jvm.nspid} "
        f"within {deadline.timeout:g} s of SIGQUIT: attach is disabled "
        "(-XX:+DisableAttachMechanism, set in a flags file or options not on its command "
        "line) or the JVM is hung"
    )


def _signal(jvm: Jvm) -> None:
    """SIGQUIT through a pidfd, and only if the pid is still a process with libjvm."""
    from .jvm import find_jvm  # noqa: PLC0415 (jvm imports nothing from here; kept local)

    try:
        pidfd = os.pidfd_open(jvm.pid)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise ProcessLookupError(jvm.pid) from exc
        pidfd = -1  # before Linux 5.3: a plain kill, right after checking the pid
    try:
        still = find_jvm(jvm.pid)
        if still is None or still.nspid != jvm.nspid:
            raise ProcessLookupError(jvm.pid)
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGQUIT)
        else:
            os.kill(jvm.pid, signal.SIGQUIT)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def load_agent(
    jvm: Jvm,
    jar: str,
    options: str = "",
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    as_target_user: bool | None = None,
) -> None:
    """Loads the Java agent jar (a path as the JVM sees it) into the JVM, passing options
    to its agentmain. as_target_user: connect as the JVM's euid/egid (None: when needed).
    Raises AttachError only."""
    deadline = _Deadline(timeout)
    if "=" in jar:
        raise AttachError(f"the agent path {jar!r} contains '=', which the JVM cannot parse")
    try:
        return _load_agent(jvm, jar, options, deadline, as_target_user)
    except AttachError:
        raise
    except OSError as exc:  # whatever else /proc or the filesystem said
        raise AttachError(f"attaching to pid {jvm.pid} failed: {exc.strerror or exc}") from exc
    except Exception as exc:  # the contract: AttachError only, even for a bug of ours
        raise AttachError(f"attaching to pid {jvm.pid} failed: {exc!r}") from exc


def _load_agent(
    jvm: Jvm, jar: str, options: str, deadline: _Deadline, as_target_user: bool | None
) -> None:
    flags = _jvm_options(jvm.pid)
    # Asked before any signal: a JVM without attach would print a thread dump on SIGQUIT.
    supported = attach_supported(jvm)
    if supported is False or (supported is None and _flag(flags, "DisableAttachMechanism")):
        raise AttachError(
            f"attach is disabled in the JVM (pid {jvm.pid}): it runs with "
            "-XX:+DisableAttachMechanism (its command line, JAVA_TOOL_OPTIONS or an options "
            "file); remove that option to let flowtap load its agent"
        )
    payload = _encode("load", ["instrument", "false", f"{jar}={options}" if options else jar])
    child = _needs_child(jvm) if as_target_user is None else as_target_user
    with target_tmp(jvm) as tmp:
        path = f"/proc/self/fd/{tmp}/{_socket_name(jvm)}"
        sock = _connect(path, deadline) if _socket_ready(tmp, jvm) else None
        if sock is None:
            if _no_signals(flags) and not jvm.sigquit_caught:
                raise AttachError(
                    f"the JVM (pid {jvm.pid}) runs with -Xrs (or -XX:+ReduceSignalUsage): it "
                    "cannot be asked to start its attach listener; run it without that option"
                )
            sock = _wait_for_socket(jvm, tmp, deadline, path)
        reply = b""
        with sock:
            _check_peer(_peer(sock), jvm.pid, jvm.uid, f"/tmp/{_socket_name(jvm)} of the JVM")
            if not child:
                reply = _exchange(sock, payload, deadline, f"the JVM (pid {jvm.pid})")
        if not reply and as_target_user is None and not deadline.expired():
            child = True  # it closed on us unanswered: it takes only its own user
        if child:
            reply = _exchange_as(jvm, tmp, payload, deadline)
    if not reply and not child and not _root_is_root_in(jvm):
        raise AttachError(
            f"the JVM (pid {jvm.pid}) refused our connection: it runs in a user namespace "
            f"where our uid {os.geteuid()} is not root, and takes only its own uid; "
            "connect as its user (as_target_user)"
        )
    parse_load_reply(reply)


# --- the child: connecting as the JVM's user --------------------------------------------------


def _exchange_as(jvm: Jvm, tmp: int, payload: bytes, deadline: _Deadline) -> bytes:
    """The exchange done by `python -m flowtap.java.attach` as the JVM's euid/egid; it gets
    the JVM's /tmp as a descriptor (it may not be able to reach /proc/PID/root itself)."""
    argv = [
        sys.executable,
        "-I",
        "-m",
        "flowtap.java.attach",
        _CHILD_ARG,
        str(tmp),
        _socket_name(jvm),
        payload.hex(),
        f"{deadline.left():.3f}",
    ]
    try:
        done = subprocess.run(
            argv,
            user=jvm.uid,
            group=jvm.gid,
            extra_groups=[],
            pass_fds=(tmp,),
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=deadline.left() + 0.5,  # the child keeps the deadline itself
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AttachError(
            f"timed out after {deadline.timeout:g} s waiting for the JVM (pid {jvm.pid})"
        ) from exc
    except OSError as exc:
        raise AttachError(f"cannot start the attach helper as uid {jvm.uid}: {exc}") from exc
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        tail = done.stderr.decode(errors="replace").strip()[-300:]
        raise AttachError(
            f"the attach helper (uid {jvm.uid}) failed (exit {done.returncode}): {tail}"
        ) from None
    if "error" in answer:
        raise AttachError(str(answer["error"]))
    _check_peer(_Peer(*answer["peer"]), jvm.pid, jvm.uid, f"/tmp/{_socket_name(jvm)} of the JVM")
    return bytes.fromhex(answer["reply"])


def _child_main(argv: list[str]) -> int:
    """Connects to the socket in the directory fd argv[0], sends the hex payload, prints
    {"peer": [pid, uid, gid], "reply": hex} or {"error": reason} as JSON."""
    dir_fd, name, payload, timeout = int(argv[0]), argv[1], bytes.fromhex(argv[2]), argv[3]
    deadline = _Deadline(float(timeout))
    path = f"/proc/self/fd/{dir_fd}/{name}"
    try:
        sock = _connect(path, deadline)
        if sock is None:
            raise AttachError(f"the JVM's socket {name} went away")
        with sock:
            peer = _peer(sock)
            reply = _exchange(sock, payload, deadline, "the JVM")
        print(json.dumps({"peer": [peer.pid, peer.uid, peer.gid], "reply": reply.hex()}))
    except AttachError as exc:
        print(json.dumps({"error": exc.reason}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == _CHILD_ARG:
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit("usage: python -m flowtap.java.attach --connect DIR_FD NAME HEX_PAYLOAD TIMEOUT")
