"""The one typed binding over libbpf (>= 1.0) through ctypes.

Nothing else in flowtap knows libbpf's C API. Every failure raises BpfError with the
errno and an explanation of what the user can do about it (see errors.py).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flowtap.loader import kernel
from flowtap.loader.errors import BpfError, explain

log = logging.getLogger("flowtap.libbpf")

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int

# int (*)(enum libbpf_print_level, const char *fmt, va_list ap)
_PRINT_FN = ctypes.CFUNCTYPE(_c_int, _c_int, _c_char_p, _c_void_p)
# int (*)(void *ctx, void *data, size_t size)
_SAMPLE_FN = ctypes.CFUNCTYPE(_c_int, _c_void_p, _c_void_p, ctypes.c_size_t)

_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2
_FAILED_PROG = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load)")


def _load_library() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise BpfError(
            "cannot load libbpf.so.1",
            fix="install libbpf >= 1.0 (Debian: apt-get install libbpf1)",
            errno_value=None,
        ) from exc


def _declare(lib: ctypes.CDLL) -> None:
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "libbpf_set_print": (_c_void_p, [_PRINT_FN]),
        "libbpf_num_possible_cpus": (_c_int, []),
        "bpf_object__open_file": (_c_void_p, [_c_char_p, _c_void_p]),
        "bpf_object__load": (_c_int, [_c_void_p]),
        "bpf_object__close": (None, [_c_void_p]),
        "bpf_object__btf": (_c_void_p, [_c_void_p]),
        "bpf_object__find_map_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
        "bpf_object__find_program_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
        "bpf_object__next_program": (_c_void_p, [_c_void_p, _c_void_p]),
        "bpf_program__name": (_c_char_p, [_c_void_p]),
        "bpf_program__section_name": (_c_char_p, [_c_void_p]),
        "bpf_program__set_autoload": (_c_int, [_c_void_p, ctypes.c_bool]),
        "bpf_program__autoload": (ctypes.c_bool, [_c_void_p]),
        "bpf_program__set_expected_attach_type": (_c_int, [_c_void_p, _c_int]),
        "bpf_program__fd": (_c_int, [_c_void_p]),
        "bpf_program__expected_attach_type": (_c_int, [_c_void_p]),
        "bpf_program__attach": (_c_void_p, [_c_void_p]),
        "bpf_program__attach_uprobe": (
            _c_void_p,
            [_c_void_p, ctypes.c_bool, _c_int, _c_char_p, ctypes.c_size_t],
        ),
        "bpf_program__attach_cgroup": (_c_void_p, [_c_void_p, _c_int]),
        "bpf_link__destroy": (_c_int, [_c_void_p]),
        "bpf_map__fd": (_c_int, [_c_void_p]),
        "bpf_map__set_max_entries": (_c_int, [_c_void_p, ctypes.c_uint32]),
        "bpf_map__set_autocreate": (_c_int, [_c_void_p, ctypes.c_bool]),
        "bpf_map__reuse_fd": (_c_int, [_c_void_p, _c_int]),
        "bpf_map__max_entries": (ctypes.c_uint32, [_c_void_p]),
        "bpf_map__key_size": (ctypes.c_uint32, [_c_void_p]),
        "bpf_map__value_size": (ctypes.c_uint32, [_c_void_p]),
        "bpf_map__type": (_c_int, [_c_void_p]),
        "bpf_map__initial_value": (_c_void_p, [_c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
        "bpf_map_update_elem": (_c_int, [_c_int, _c_void_p, _c_void_p, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (_c_int, [_c_int, _c_void_p, _c_void_p]),
        "bpf_map_delete_elem": (_c_int, [_c_int, _c_void_p]),
        "bpf_map_get_next_key": (_c_int, [_c_int, _c_void_p, _c_void_p]),
        "ring_buffer__new": (_c_void_p, [_c_int, _SAMPLE_FN, _c_void_p, _c_void_p]),
        "ring_buffer__poll": (_c_int, [_c_void_p, _c_int]),
        "ring_buffer__consume": (_c_int, [_c_void_p]),
        "ring_buffer__free": (None, [_c_void_p]),
        "btf__find_by_name_kind": (ctypes.c_int32, [_c_void_p, _c_char_p, ctypes.c_uint32]),
        "btf__type_by_id": (_c_void_p, [_c_void_p, ctypes.c_uint32]),
        "btf__name_by_offset": (_c_char_p, [_c_void_p, ctypes.c_uint32]),
        "btf__resolve_size": (ctypes.c_int64, [_c_void_p, ctypes.c_uint32]),
        "btf__resolve_type": (_c_int, [_c_void_p, ctypes.c_uint32]),
    }
    for name, (restype, argtypes) in signatures.items():
        func = getattr(lib, name)
        func.restype = restype
        func.argtypes = argtypes


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.vsnprintf.argtypes = [_c_char_p, ctypes.c_size_t, _c_char_p, _c_void_p]
_libc.vsnprintf.restype = _c_int


# libbpf prints a refused program's whole verifier log as one message, and the reason is
# at its end: room for all of it (libbpf's own log buffer is smaller than this).
_MESSAGE_BYTES = 4 << 20


class _Messages:
    """Keeps libbpf's recent messages so a failure can quote the verifier's reasons."""

    def __init__(self) -> None:
        self.recent: collections.deque[str] = collections.deque(maxlen=400)
        self.lock = threading.Lock()
        self._buf: ctypes.Array[ctypes.c_char] | None = None

    def handle(self, level: int, fmt: bytes | None, args: int | None) -> int:
        if level == _LIBBPF_DEBUG:
            return 0  # thousands per load; failures and the verifier's log are warnings
        with self.lock:
            if self._buf is None:
                self._buf = ctypes.create_string_buffer(_MESSAGE_BYTES)
            _libc.vsnprintf(self._buf, len(self._buf), fmt, args)
            text = self._buf.value.decode("utf-8", "replace").rstrip("\n")
            # A verifier log arrives as one message: keep its lines, so its end survives.
            self.recent.extend(text.splitlines() or [""])
        if level == _LIBBPF_WARN:
            log.debug("libbpf: %s", text)
        return 0

    def take(self) -> list[str]:
        with self.lock:
            lines = list(self.recent)
            self.recent.clear()
        return lines


_lib: ctypes.CDLL | None = None
_messages = _Messages()
_print_callback = _PRINT_FN(_messages.handle)


def lib() -> ctypes.CDLL:
    """libbpf.so.1, loaded and declared once."""
    global _lib  # noqa: PLW0603  (one process-wide library handle)
    if _lib is None:
        loaded = _load_library()
        _declare(loaded)
        loaded.libbpf_set_print(_print_callback)
        _lib = loaded
    return _lib


def _fail(action: str, err: int, subject: str = "") -> BpfError:
    return explain(action, err, subject=subject, libbpf_log=_messages.take())


def _check_ptr(ptr: int | None, action: str, subject: str = "") -> int:
    if not ptr:
        raise _fail(action, ctypes.get_errno() or errno.EINVAL, subject)
    return ptr


def _check_ret(ret: int, action: str, subject: str = "") -> None:
    if ret < 0:
        # libbpf 1.x returns -errno; a bare -1 means "see errno".
        raise _fail(action, ctypes.get_errno() if ret == -1 else -ret, subject)


def possible_cpus() -> int:
    count: int = lib().libbpf_num_possible_cpus()
    if count <= 0:
        raise _fail("count possible CPUs", -count)
    return count


class BpfLink:
    """An attachment; destroying it (or the process exiting) detaches the program. Made
    by libbpf (a bpf_link pointer) or by the bpf(2) syscall directly (a link fd)."""

    def __init__(self, ptr: int, description: str, *, fd: int | None = None) -> None:
        self._ptr: int | None = ptr or None
        self._fd = fd
        self.description = description

    @classmethod
    def of_fd(cls, fd: int, description: str) -> BpfLink:
        return cls(0, description, fd=fd)

    def destroy(self) -> None:
        if self._ptr:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def attached(self) -> bool:
        return self._ptr is not None or self._fd is not None


class BpfProgram:
    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        self.name: str = lib().bpf_program__name(ptr).decode()
        self.section: str = lib().bpf_program__section_name(ptr).decode()

    def set_autoload(self, enabled: bool) -> None:
        _check_ret(lib().bpf_program__set_autoload(self._ptr, enabled), "set autoload", self.name)

    @property
    def autoload(self) -> bool:
        """Whether load() loads it (the hook plan turns off what this kernel cannot take)."""
        return bool(lib().bpf_program__autoload(self._ptr))

    def attach(self) -> BpfLink:
        """Attaches by section name (tracepoint, tp_btf, raw_tp, ...)."""
        ptr = _check_ptr(lib().bpf_program__attach(self._ptr), "attach", self._subject())
        return BpfLink(ptr, self._subject())

    def attach_uprobe(
        self, binary: str, offset: int, *, pid: int = -1, retprobe: bool = False
    ) -> BpfLink:
        """Attaches at a file offset of binary; pid -1 means every process mapping it."""
        subject = f"{self.name} at {binary}+{offset:#x}"
        ptr = _check_ptr(
            lib().bpf_program__attach_uprobe(self._ptr, retprobe, pid, binary.encode(), offset),
            "attach uprobe",
            subject,
        )
        return BpfLink(ptr, subject)

    def set_expected_attach_type(self, attach_type: int) -> None:
        """Before load (uprobe_multi programs: kernel.BPF_TRACE_UPROBE_MULTI)."""
        _check_ret(
            lib().bpf_program__set_expected_attach_type(self._ptr, attach_type),
            "set expected attach type",
            self.name,
        )

    @property
    def expected_attach_type(self) -> int:
        return int(lib().bpf_program__expected_attach_type(self._ptr))

    def attach_uprobe_multi(
        self, binary: str, offsets: list[int], *, pid: int = -1, retprobe: bool = False
    ) -> BpfLink:
        """One link for every offset of binary (a program loaded for uprobe_multi)."""
        kind = "uretprobe" if retprobe else "uprobe"
        subject = f"{self.name} ({kind}_multi) at {len(offsets)} offsets of {binary}"
        fd, err = kernel.uprobe_multi_link(
            lib().bpf_program__fd(self._ptr), binary, offsets, retprobe=retprobe, pid=pid
        )
        if fd < 0:
            raise _fail("attach uprobe_multi", err, subject)
        return BpfLink.of_fd(fd, subject)

    def attach_cgroup(self, cgroup_fd: int) -> BpfLink:
        ptr = _check_ptr(
            lib().bpf_program__attach_cgroup(self._ptr, cgroup_fd), "attach to cgroup", self.name
        )
        return BpfLink(ptr, f"{self.name} on cgroup fd {cgroup_fd}")

    def _subject(self) -> str:
        return f"{self.name} ({self.section})"


class BpfMap:
    BPF_ANY = 0
    BPF_NOEXIST = 1
    _PERCPU_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, ...

    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        fd: int = lib().bpf_map__fd(self._ptr)
        if fd < 0:
            raise BpfError(f"map {self.name} is not loaded yet", fix="load the object first")
        return fd

    @property
    def key_size(self) -> int:
        return int(lib().bpf_map__key_size(self._ptr))

    @property
    def value_size(self) -> int:
        """Size of the buffer a lookup fills: per CPU maps hold one slot per possible CPU."""
        size = int(lib().bpf_map__value_size(self._ptr))
        if lib().bpf_map__type(self._ptr) in self._PERCPU_TYPES:
            return ((size + 7) // 8 * 8) * possible_cpus()
        return size

    def set_max_entries(self, count: int) -> None:
        _check_ret(lib().bpf_map__set_max_entries(self._ptr, count), "resize map", self.name)

    def set_autocreate(self, enabled: bool) -> None:
        """Before load: a map this kernel cannot create (or the plan does not use) is left
        out; libbpf poisons its references in code the verifier never reaches."""
        _check_ret(lib().bpf_map__set_autocreate(self._ptr, enabled), "set autocreate", self.name)

    def reuse(self, other: BpfMap) -> None:
        """Before load: this map becomes `other`, a loaded map of another object, so the
        two objects share one table."""
        _check_ret(lib().bpf_map__reuse_fd(self._ptr, other.fd), "reuse map", self.name)

    def write_initial_value(self, offset: int, data: bytes) -> None:
        """Writes into the image of a global data section (.rodata, .bss) before load."""
        size = ctypes.c_size_t()
        ptr = _check_ptr(
            lib().bpf_map__initial_value(self._ptr, ctypes.byref(size)),
            "read initial value",
            self.name,
        )
        if offset < 0 or offset + len(data) > size.value:
            raise BpfError(f"write of {len(data)} bytes at {offset} overflows {self.name}")
        ctypes.memmove(ptr + offset, data, len(data))

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        ret = lib().bpf_map_update_elem(self.fd, key, value, flags)
        _check_ret(ret, "update map", self.name)

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        ret = lib().bpf_map_lookup_elem(self.fd, key, value)
        if ret < 0:
            err = ctypes.get_errno() if ret == -1 else -ret
            if err == errno.ENOENT:
                return None
            raise _fail("look up map", err, self.name)
        return value.raw

    def delete(self, key: bytes) -> bool:
        ret = lib().bpf_map_delete_elem(self.fd, key)
        if ret < 0:
            err = ctypes.get_errno() if ret == -1 else -ret
            if err == errno.ENOENT:
                return False
            raise _fail("delete from map", err, self.name)
        return True

    def iter_keys(self) -> Iterator[bytes]:
        key_size = self.key_size
        current: bytes | None = None
        for _ in range(1 << 24):  # bounded: no map here holds more entries
            nxt = ctypes.create_string_buffer(key_size)
            ret = lib().bpf_map_get_next_key(self.fd, current, nxt)
            if ret < 0:
                return
            current = nxt.raw
            yield current


class RingBuffer:
    """Consumes a BPF_MAP_TYPE_RINGBUF map; callback gets each record's bytes."""

    def __init__(self, ring: BpfMap, callback: Callable[[bytes], None]) -> None:
        self._callback = callback
        self._error: BaseException | None = None
        self._sample = _SAMPLE_FN(self._on_sample)
        self._ptr: int | None = _check_ptr(
            lib().ring_buffer__new(ring.fd, self._sample, None, None),
            "open ring buffer",
            ring.name,
        )

    def _on_sample(self, _ctx: int | None, data: int | None, size: int) -> int:
        if not data:
            return 0
        try:
            self._callback(ctypes.string_at(data, size))
        except BaseException as exc:  # re-raised from poll(): never unwind through C
            self._error = exc
            return -1
        return 0

    def poll(self, timeout_ms: int) -> int:
        """Waits up to timeout_ms for records and consumes them; returns how many."""
        if self._ptr is None:
            raise BpfError("ring buffer is closed", fix="create a new RingBuffer")
        ret: int = lib().ring_buffer__poll(self._ptr, timeout_ms)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if ret < 0 and -ret != errno.EINTR:
            raise _fail("poll ring buffer", -ret)
        return max(ret, 0)

    def consume(self) -> int:
        """Consumes what is there without waiting; returns how many records."""
        if self._ptr is None:
            raise BpfError("ring buffer is closed", fix="create a new RingBuffer")
        ret: int = lib().ring_buffer__consume(self._ptr)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if ret < 0:
            raise _fail("consume ring buffer", -ret)
        return ret

    def free(self) -> None:
        if self._ptr is not None:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None


class BpfObject:
    """A compiled BPF object file: open, adjust, load, then find maps and programs."""

    def __init__(self, ptr: int, path: Path) -> None:
        self._ptr: int | None = ptr
        self.path = path

    @classmethod
    def open(cls, path: Path) -> BpfObject:
        if not path.exists():
            raise BpfError(
                f"BPF object {path} not found",
                fix="build it with `make bpf` (the package ships objects built by make)",
            )
        ptr = _check_ptr(
            lib().bpf_object__open_file(os.fsencode(path), None), "open BPF object", str(path)
        )
        return cls(ptr, path)

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise BpfError("BPF object is closed", fix="open it again")
        return self._ptr

    @property
    def btf_ptr(self) -> int:
        return _check_ptr(lib().bpf_object__btf(self.ptr), "read BTF of", str(self.path))

    def map(self, name: str) -> BpfMap:
        ptr = lib().bpf_object__find_map_by_name(self.ptr, name.encode())
        if not ptr:
            raise BpfError(f"map {name!r} not in {self.path}", fix="rebuild the BPF objects")
        return BpfMap(ptr, name)

    def program(self, name: str) -> BpfProgram:
        ptr = lib().bpf_object__find_program_by_name(self.ptr, name.encode())
        if not ptr:
            raise BpfError(f"program {name!r} not in {self.path}", fix="rebuild the BPF objects")
        return BpfProgram(ptr)

    def programs(self) -> list[BpfProgram]:
        found: list[BpfProgram] = []
        ptr = lib().bpf_object__next_program(self.ptr, None)
        while ptr:
            found.append(BpfProgram(ptr))
            ptr = lib().bpf_object__next_program(self.ptr, ptr)
        return found

    def load(self) -> None:
        ret: int = lib().bpf_object__load(self.ptr)
        if ret >= 0:
            return
        err = ctypes.get_errno() if ret == -1 else -ret
        lines = _messages.take()
        subject = str(self.path)
        # Name the program the kernel refused, with its section (its hook type).
        failed = next((m.group(1) for line in lines if (m := _FAILED_PROG.search(line))), None)
        if failed is not None:
            subject = f"{failed} ({self.program(failed).section}) from {self.path}"
        raise explain("load BPF program", err, subject=subject, libbpf_log=lines)

    def close(self) -> None:
        if self._ptr is not None:
            lib().bpf_object__close(self._ptr)
            self._ptr = None
