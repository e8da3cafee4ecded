"""Files the sensor writes as root, safe in directories other users can write.

flowtap runs as root and is told where to write (output, stats, ready file, trust store,
state). A user who can write one of those directories could plant a symbolic link, a hard
link or a file of their own there, to have root overwrite, chmod or feed something else.
So every writer goes through this module, which works on a descriptor of the directory
(openat-style, the directory checked once) and:

- never follows a symbolic link in a directory others can write (O_NOFOLLOW); one in a
  directory only root (or we) can write was put there by root and is followed;
- never writes into a file another user owns, nor into a regular file with several
  names (a hard link to a file elsewhere), but refuses with a message saying what to do;
- replaces whole files atomically: a fresh owner-only temporary file (O_CREAT|O_EXCL,
  random name) renamed over the target, so readers never see half a file;
- creates every file owner-only (0600) unless the caller says otherwise (the trust store's
  certificate must be readable by clients).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path

__all__ = [
    "Reservation",
    "UnsafeFileError",
    "lstat",
    "open_append",
    "private_directory",
    "remove",
    "replace",
    "rotate",
]

_FOLLOW_DEPTH = 8  # symbolic links followed in trusted directories, at most


class UnsafeFileError(OSError):
    """A path flowtap will not write: the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Directory:
    """A descriptor of the directory holding a path, and whether others can write it."""

    def __init__(self, path: Path) -> None:
        self.path = path.parent
        self.name = path.name
        if not self.name or self.name in (".", ".."):
            raise UnsafeFileError(f"{path}: not a file name; give the path of a file")
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        # Root's or ours, writable by nobody else: whatever is in it was put there by us.
        self.trusted = st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> _Directory:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def lstat(self) -> os.stat_result | None:
        try:
            return os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def link_target(self) -> Path:
        """Where a symbolic link in this (trusted) directory points, as an absolute path."""
        target = Path(os.readlink(self.name, dir_fd=self.fd))
        return target if target.is_absolute() else self.path / target


def _refuse_symlink(path: Path, directory: Path) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} is a symbolic link in {directory}, a directory other users can write: "
        "flowtap does not follow it (it could point at any file on the host); remove the "
        "link, give the real path, or use a directory only root can write"
    )


def _check(path: Path, st: os.stat_result) -> None:
    """Refuses a file that is not ours to write into."""
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFDIR:
        raise UnsafeFileError(f"{path} is a directory; give the path of a file")
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        return  # only root makes device nodes (/dev/null, a terminal)
    if st.st_uid != os.geteuid():
        raise UnsafeFileError(
            f"{path} belongs to another user (uid {st.st_uid}): flowtap does not write into "
            "a file another user owns; remove it, or choose another path"
        )
    if kind == stat.S_IFREG and st.st_nlink > 1:
        raise UnsafeFileError(
            f"{path} has {st.st_nlink} names (hard links): flowtap does not write into a "
            "file that is also elsewhere; remove it, or choose another path"
        )


def open_append(path: str | os.PathLike[str], *, truncate: bool = False) -> int:
    """A descriptor for appending to path (created 0600; an existing file of ours is
    narrowed to 0600; a device or a pipe of ours keeps its mode)."""
    return _open_append(Path(path), truncate, _FOLLOW_DEPTH)


def _open_append(path: Path, truncate: bool, depth: int) -> int:
    with _Directory(path) as directory:
        st = directory.lstat()
        if st is not None and stat.S_ISLNK(st.st_mode):
            if not directory.trusted:
                raise _refuse_symlink(path, directory.path)
            if depth == 0:
                raise UnsafeFileError(f"{path}: too many symbolic links; give the real path")
            return _open_append(directory.link_target(), truncate, depth - 1)
        if st is not None:
            _check(path, st)  # before open: a planted FIFO must not block us
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(directory.name, flags, 0o600, dir_fd=directory.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a link planted since the look above
                raise _refuse_symlink(path, directory.path) from exc
            raise
    try:
        st = os.fstat(fd)
        _check(path, st)  # what was opened, whatever changed since the look
        if stat.S_ISREG(st.st_mode):
            os.fchmod(fd, 0o600)
            if truncate:
                os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Reservation:
    """A whole-file replacement prepared early: its temporary file is made (and its space
    allocated) now, so that it can still be written when the filesystem fills up later
    (the stats file at exit, on the filesystem of a full output file)."""

    def __init__(self, path: str | os.PathLike[str], size: int, *, mode: int = 0o600) -> None:
        self.path = Path(path)
        self._mode = mode
        self._directory = _Directory(self.path)
        self._temporary: str | None = None
        self._fd: int | None = None
        try:
            self._fd, self._temporary = _temporary(self._directory, mode)
            with contextlib.suppress(OSError):  # no fallocate: written at commit, if it can
                os.posix_fallocate(self._fd, 0, size)
        except BaseException:
            self.abandon()
            raise

    def commit(self, data: bytes) -> None:
        """Writes data into the reserved file and renames it over the target."""
        assert self._fd is not None and self._temporary is not None, "committed twice"
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            _write_all(self._fd, data)
            os.ftruncate(self._fd, len(data))
            os.fsync(self._fd)
            _rename_over(self._directory, self._temporary, self.path)
            self._temporary = None
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Removes the temporary file (if still there) and lets go of the directory."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temporary, dir_fd=self._directory.fd)
            self._temporary = None
        if self._directory.fd >= 0:
            self._directory.close()
            self._directory.fd = -1


def _temporary(directory: _Directory, mode: int) -> tuple[int, str]:
    """A new file (never an existing one, never through a link) in directory."""
    name = f".{directory.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=directory.fd)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it (a trust store must be 0644)
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=directory.fd)
        raise
    return fd, name


def _rename_over(directory: _Directory, temporary: str, path: Path) -> None:
    """Renames temporary over directory.name, unless what is there is not ours to replace."""
    st = directory.lstat()
    if st is not None and not stat.S_ISLNK(st.st_mode):
        _check(path, st)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path} is not a regular file; remove it or choose another path")
    # rename() replaces a symbolic link itself (never its target): safe even when planted.
    os.rename(temporary, directory.name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)


def replace(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, follow: bool = True
) -> None:
    """Replaces path with data atomically, the new file with mode (default owner-only).

    A device or a pipe of ours at path (`--stats-file /dev/stdout`) is written, not
    replaced; a symbolic link in a directory only root can write is followed (unless
    follow is False: the link itself is then replaced)."""
    target = Path(path)
    for _ in range(_FOLLOW_DEPTH):
        with _Directory(target) as directory:
            st = directory.lstat()
            if st is not None and stat.S_ISLNK(st.st_mode) and directory.trusted and follow:
                target = directory.link_target()
                continue
            if st is not None and stat.S_IFMT(st.st_mode) in (
                stat.S_IFCHR,
                stat.S_IFIFO,
                stat.S_IFSOCK,
            ):
                break  # written in place below
            fd, temporary = _temporary(directory, mode)
            try:
                with os.fdopen(fd, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                _rename_over(directory, temporary, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=directory.fd)
                raise
            return
    else:
        raise UnsafeFileError(f"{path}: too many symbolic links; give the real path")
    fd = _open_append(target, False, 0)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def rotate(path: str | os.PathLike[str], keep: int, current: int) -> int:
    """Rotates a log file: path.1 .. path.keep-1 move up one (path.keep is removed), the
    file at path becomes path.1, and a new empty owner-only file takes path's name, in one
    rename (path always names a whole file). `current` is a descriptor of the file at path:
    if path no longer names it (moved or replaced by someone), nothing is rotated away and
    the new file is made at path all the same. Returns a descriptor appending to the new
    file; `current` stays open (the caller closes it)."""
    target = Path(path)
    with _Directory(target) as directory:
        name, dirfd = directory.name, directory.fd
        fd, temporary = _temporary(directory, 0o600)
        try:
            st = directory.lstat()
            ours = os.fstat(current)
            same = st is not None and (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)
            if keep > 0 and same:
                _remove_in(directory, f"{name}.{keep}")
                for number in range(keep - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(
                            f"{name}.{number}",
                            f"{name}.{number + 1}",
                            src_dir_fd=dirfd,
                            dst_dir_fd=dirfd,
                        )
                # A second name first, then the new file renamed over the first: the old
                # file is never without a name, path never without a file.
                os.link(
                    name, f"{name}.1", src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False
                )
            if same:  # our own file (it has two names now: _rename_over would refuse it)
                os.rename(temporary, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            else:
                _rename_over(directory, temporary, target)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dirfd)
            raise
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    return fd


def _remove_in(directory: _Directory, name: str) -> None:
    """Removes name from directory if it is there and not another user's."""
    try:
        st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid() and not stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError(
            f"{directory.path / name} belongs to another user (uid {st.st_uid}): flowtap "
            "does not remove it; remove it yourself, or choose another path"
        )
    os.unlink(name, dir_fd=directory.fd)


def lstat(path: str | os.PathLike[str]) -> os.stat_result | None:
    """What is at path itself (a link is not followed); None when nothing is."""
    try:
        return os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove(path: str | os.PathLike[str]) -> bool:
    """Removes path if it is a file of ours (never someone else's, never a link's
    target); returns whether it did."""
    target = Path(path)
    try:
        with _Directory(target) as directory:
            st = directory.lstat()
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return False
            os.unlink(directory.name, dir_fd=directory.fd)
            return True
    except FileNotFoundError:
        return False


def private_directory(path: str | os.PathLike[str], *, what: str = "state directory") -> None:
    """Creates path (mode 0700) if needed; refuses one that is not ours, or that others can
    write (they could swap the files in it)."""
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UnsafeFileError(
            f"the {what} {directory} belongs to uid {st.st_uid} with mode "
            f"{st.st_mode & 0o7777:o}: other users could change what flowtap keeps there; "
            f"run `chown {os.geteuid()} {directory}; chmod 700 {directory}`, or choose another "
            "directory"
        )
