"""Go crypto/tls in the executable (golang.py): probed at (*Conn).Read/Write and the
handshakes; after attaching, the kernel is told that Go probes exist (go_probed) and how
to walk this executable's tls.Conn to its socket (go_executables)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flowtap.loader.errors import BpfError
from flowtap.tls import golang
from flowtap.tls.elf import ElfImage
from flowtap.tls.golang import GoPlacement, UnsupportedGoError, go_version, plan_go
from flowtap.tls.identity import FileKey, stat_key
from flowtap.tls.plugins.base import AttachContext, NotProbedError, Undo

log = logging.getLogger("flowtap.tls")


class GoTls:
    name = "gotls"
    source = "gotls"
    source_enum = "FT_SOURCE_GOTLS"
    log_name = "go tls"
    # Every Go executable has it: each one is looked at, so that one that is not probed
    # is logged with its version and the reason.
    signatures: tuple[bytes, ...] = (golang.SIGNATURE,)
    shared_libraries: tuple[str, ...] = ()  # executables only

    def classify(self, image: ElfImage, access: Path, *, internal: bool) -> GoPlacement | None:
        try:
            return plan_go(image)
        except UnsupportedGoError as exc:
            raise NotProbedError(f"Go TLS not probed: {exc}") from exc

    def owns(self, image: ElfImage, access: Path) -> bool:
        try:
            return go_version(image) is not None
        except UnsupportedGoError:
            return True  # Go, of a build this sensor does not read

    def after_attach(
        self, plan: GoPlacement, ctx: AttachContext, *, path: str, key: FileKey, target: str
    ) -> Undo | None:
        ctx.set_flag("go_probed")
        if plan.walk is None:
            return None
        return _add_go_executable(ctx, plan.walk, path=path, key=key, target=target)


def _add_go_executable(
    ctx: AttachContext, walk: golang.GoConnWalk, *, path: str, key: FileKey, target: str
) -> Undo | None:
    """Lets the kernel walk this executable's tls.Conn to its socket (keyed as the
    kernel sees the file: mm->exe_file's inode, which on overlayfs is the overlay's,
    not the layer's that key names; stat() through the process gives it)."""
    btf = ctx.btf()
    try:
        major, minor, inode = stat_key(os.stat(target))
    except OSError:
        major, minor, inode = key
    map_key = btf.struct_layout("ft_go_executable_key").pack(
        {"ino": inode, "dev": major << 20 | minor}
    )
    value = btf.struct_layout("ft_go_executable").pack(
        {
            "itab_tcpconn": walk.itab_tcpconn,
            "conn_offset": walk.conn_offset,
            "fd_offset": walk.fd_offset,
            "sysfd_offset": walk.sysfd_offset,
        }
    )
    try:
        ctx.update_map("go_executables", map_key, value)
    except BpfError as exc:
        log.warning("%s: tls.Conn walk not set up: %s", path, exc)
        return None
    # The table is small (1,024 executables): a deleted file's entry must go with it.
    return lambda: ctx.delete_map("go_executables", map_key)


GOTLS = GoTls()
