"""Putting the agent's files where a JVM can open them: a fresh directory in its /tmp.

The JVM may live in another mount namespace (a container), so the agent jar and the shim
.so are copied into its own /tmp, reached through /proc/PID/root. That /tmp is writable by
everyone: the directory gets a random name and is made by us (mkdirat, 0711: the JVM's
user can open the files, nobody can list or add to it), and each file is created in it
with O_EXCL|O_NOFOLLOW through descriptors, never by path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from .attach import AttachError, target_tmp
from .jvm import Jvm

__all__ = ["Staged", "stage"]

_DIR_PREFIX = ".flowtap-"
_CHUNK = 1 << 20


@dataclass
class Staged:
    """Files staged for one JVM: target_paths as the JVM sees them (for the attach
    request), host_paths as we can reach them (through /proc/PID/root)."""

    directory: str  # as the JVM sees it: /tmp/.flowtap-XXXX
    target_paths: dict[str, str]
    host_paths: dict[str, str]
    _dir_fd: int = field(repr=False)
    _names: list[str] = field(repr=False, default_factory=list)

    def cleanup(self) -> None:
        """Removes the files and the directory (through the descriptor we kept: works
        after the JVM exited too); idempotent, never raises."""
        if self._dir_fd < 0:
            return
        for name in self._names:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir_fd)
        with contextlib.suppress(OSError):
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._dir_fd)
            try:
                os.rmdir(os.path.basename(self.directory), dir_fd=parent)
            finally:
                os.close(parent)
        os.close(self._dir_fd)
        self._dir_fd = -1


def _copy(source: str, dir_fd: int, name: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(source, "rb") as src:
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o644)  # whatever our umask: the JVM's user must read it
            while chunk := src.read(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def stage(jvm: Jvm, files: Mapping[str, str]) -> Staged:
    """Copies files ({name in the directory: source path on our side}) into a new
    directory in the JVM's /tmp. Raises AttachError only (the partial copy is removed)."""
    try:
        return _stage(jvm, files)
    except AttachError:
        raise
    except Exception as exc:  # the contract: AttachError only
        raise AttachError(f"cannot stage files for pid {jvm.pid}: {exc}") from exc


def _stage(jvm: Jvm, files: Mapping[str, str]) -> Staged:
    for name in files:
        if not name or "/" in name or name in (".", ".."):
            raise AttachError(f"bad staged file name {name!r}")
    with target_tmp(jvm) as tmp:
        for _ in range(8):
            dirname = _DIR_PREFIX + secrets.token_hex(8)
            try:
                os.mkdir(dirname, 0o711, dir_fd=tmp)
                break
            except FileExistsError:
                continue  # someone guessed; take another name
            except OSError as exc:
                raise AttachError(
                    f"cannot make a directory in /tmp of pid {jvm.pid}: {exc.strerror or exc}"
                ) from exc
        else:
            raise AttachError(f"cannot make a directory of a fresh name in /tmp of pid {jvm.pid}")
        try:
            dir_fd = os.open(dirname, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=tmp)
        except OSError as exc:
            raise AttachError(f"the staging directory in /tmp of pid {jvm.pid} changed") from exc
    staged = Staged(
        directory=f"/tmp/{dirname}",
        target_paths={name: f"/tmp/{dirname}/{name}" for name in files},
        host_paths={name: f"{jvm.root}/tmp/{dirname}/{name}" for name in files},
        _dir_fd=dir_fd,
    )
    try:
        st = os.fstat(dir_fd)
        if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
            raise AttachError(f"the staging directory in /tmp of pid {jvm.pid} is not ours")
        os.fchmod(dir_fd, 0o711)
        for name, source in files.items():
            staged._names.append(name)
            try:
                _copy(source, dir_fd, name)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    staged._names.pop()  # not ours: leave it alone
                raise AttachError(f"cannot stage {source} for pid {jvm.pid}: {exc}") from exc
    except BaseException:
        staged.cleanup()
        raise
    return staged
