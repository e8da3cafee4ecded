"""TLS plaintext from programs whose libssl is mapped from an overlayfs, as Docker and
containerd run containers: one set of probes per library file, one record per
transaction.

Each test builds a root in its tmp dir (copies of the host's libssl and libcrypto, and
openssl and curl with the libraries they need), mounts an overlay on it there, and
unmounts it at the end. Programs reach that libssl through the overlay (LD_LIBRARY_PATH,
or a private mount namespace whose root is the overlay, as a container's) and through
the layer below directly: the kernel maps the same file for both.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import (
    CURL,
    OPENSSL,
    PYTHON,
    TLS_PEER,
    Lab,
    Peer,
    Record,
    Sensor,
    find_pairs,
    wait_until,
)
from .tls_peer import body_bytes

pytestmark = pytest.mark.e2e

LIBDIR = "usr/lib/x86_64-linux-gnu"
# s_server -HTTP sends these files as they are (status line and headers included).
PAGES = {
    "alpha": (200, b"first page"),
    "beta": (201, b"created: beta"),
    "gamma": (404, b"no such thing"),
}
READY_S = 90.0
SETTLE_S = 1.0  # after the expected records: time for a duplicate to show up


@dataclass
class OverlayRoot:
    top: Path  # the overlay's mount point
    below: Path  # its lower directory

    def libssl(self, *, through_overlay: bool) -> Path:
        return (self.top if through_overlay else self.below) / LIBDIR / "libssl.so.3"


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source.resolve(), target)  # a copy: its own inode, not the host's


def build_root(root: Path, pki: dict[str, Path]) -> None:
    """openssl and curl with every library they load (libssl, libcrypto: copies), the
    test's certificates under /pki and the server's pages under /srv."""
    for program in (OPENSSL, CURL):
        _copy(Path(program), root / program.lstrip("/"))
        linked = subprocess.run(
            ["ldd", program], capture_output=True, text=True, check=True, timeout=20
        ).stdout
        for library in re.findall(r"(/\S+) \(0x", linked):
            path = Path(library)
            if path.name.startswith("ld-linux"):
                _copy(path, root / library.lstrip("/"))  # the interpreter, /lib64/...
            _copy(path, root / LIBDIR / path.name)
    (root / "lib").symlink_to("usr/lib")
    for name in ("ca", "cert", "key"):
        _copy(pki[name], root / "pki" / pki[name].name)
    for name, (status, body) in PAGES.items():
        # s_server closes after each answer: said, so that clients never reuse it.
        head = f"HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {len(body)}"
        (root / "srv").mkdir(exist_ok=True)
        (root / "srv" / name).write_bytes(head.encode() + b"\r\n\r\n" + body)


@pytest.fixture
def overlay(tmp_path: Path, pki: dict[str, Path]) -> Iterator[OverlayRoot]:
    """The root, mounted as an overlay's lower layer; unmounted even when the test fails
    (the test's processes are gone by then: this fixture is set up before the lab)."""
    base = tmp_path / "overlay"
    lower, upper, work, top = (base / name for name in ("lower", "upper", "work", "top"))
    base.mkdir()
    # On a tmpfs of its own: an upper layer cannot be on overlayfs (the kmatrix guests'
    # root is one).
    mounted = [base]
    mount("-t", "tmpfs", "-o", "size=256m,mode=755", "tmpfs", str(base))
    try:
        for directory in (lower, upper, work, top):
            directory.mkdir()
        build_root(lower, pki)
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        mount("-t", "overlay", "-o", options, "overlay", str(top))
        mounted.append(top)
        yield OverlayRoot(top, lower)
    finally:
        for point in reversed(mounted):
            if subprocess.run(["umount", str(point)], timeout=20, check=False).returncode:
                subprocess.run(["umount", "--lazy", str(point)], timeout=20, check=False)


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, timeout=20)


def in_root(overlay: OverlayRoot, *argv: str) -> list[str]:
    """argv run in a private mount namespace whose root is the overlay, as a container."""
    return ["unshare", "--mount", f"--root={overlay.top}", "--wd=/srv", *argv]


def start_sensor(e2e: Lab) -> Sensor:
    """Scoped to the test's cgroup; a longer wait for its start than elsewhere, for the
    kmatrix guests (software-emulated CPUs), where these tests were run too."""
    sensor = e2e.sensor(extra=["--capture-level", "full"], wait=False)
    sensor.wait_ready(READY_S)
    return sensor


def wait_mapped(peer: Peer, library: Path) -> None:
    """Until peer maps library (python loads libssl when it imports ssl, at start)."""

    def mapped() -> bool:
        with contextlib.suppress(OSError):
            return str(library) in Path(f"/proc/{peer.pid}/maps").read_text()
        return False

    wait_until(mapped, 20, f"pid {peer.pid} to map {library}", describe=peer.stderr)


def assert_probed_once(sensor: Sensor, overlay: OverlayRoot) -> str:
    """One attach log line and one stats entry for a libssl from the overlay's root
    (through it or in its layer); returns the path the entry names."""
    where = (str(overlay.top), str(overlay.below))
    attached = [
        line
        for line in sensor.log.read_text(errors="replace").splitlines()
        if "probes attached to" in line
    ]
    lines = [line for line in attached if any(w in line for w in where)]
    assert len(lines) == 1, "\n".join(attached)
    assert sensor.stats is not None
    paths = [
        str(entry["path"])
        for entry in sensor.stats["tls"]["attached"]
        if any(w in str(entry["path"]) for w in where)
    ]
    assert len(paths) == 1 and paths[0].endswith("/libssl.so.3"), paths
    return paths[0]


def wait_stable(sensor: Sensor, count: int) -> list[Record]:
    """The http records once there are `count`, and still `count` a moment later."""
    sensor.wait_for(
        lambda _r: len(sensor.http_records()) >= count, timeout=20, what=f"{count} http records"
    )
    time.sleep(SETTLE_S)
    records = sensor.http_records()
    assert len(records) == count, sensor.describe()
    return records


def egress_ids(connections: list[Record], pid: int, port: int) -> list[int]:
    """The connection ids of pid's connections to port, in the order they opened."""
    pairs = find_pairs(connections, pid=pid, direction="egress", remote_port=port)
    return [opened["connection_id"] for opened, _closed in pairs]


def ingress_ids(connections: list[Record], pid: int, port: int) -> set[int]:
    pairs = find_pairs(connections, pid=pid, direction="ingress", local_port=port)
    return {opened["connection_id"] for opened, _closed in pairs}


def transaction(record: Record) -> tuple[str, str, int, bytes]:
    request, response = record["request"], record["response"]
    body = base64.b64decode(response.get("body") or "")
    return request["method"], request["path"], response["status"], body


def answered(peer: Peer) -> Callable[[], bool]:
    return lambda: bool(peer.messages("response"))


def tls_client(
    e2e: Lab, pki: dict[str, Path], port: int, libdir: Path, paths: list[str], go: Path, again: Path
) -> Peer:
    """tls_peer.py's client (python, keep-alive), loading libssl from libdir."""
    argv = [PYTHON, str(TLS_PEER), "client", "--port", str(port), "--ca", str(pki["ca"])]
    argv += ["--paths", *paths, "--go", str(go), "--again", str(again)]
    return e2e.spawn(argv, cgroup=e2e.cgroup, stem="client", env={"LD_LIBRARY_PATH": str(libdir)})


def test_library_path_into_overlay_and_below(
    overlay: OverlayRoot, e2e: Lab, pki: dict[str, Path]
) -> None:
    """A server and a client load libssl through the overlay, another client from the
    layer below: one set of probes, and every transaction once at each end."""
    top_libdir = overlay.top / LIBDIR
    argv = [PYTHON, str(TLS_PEER), "server", "--cert", str(pki["cert"]), "--key", str(pki["key"])]
    server = e2e.spawn(
        argv, cgroup=e2e.cgroup, stem="server", env={"LD_LIBRARY_PATH": str(top_libdir)}
    )
    port = int(server.wait_message("listening")["port"])
    go_a, again_a, go_b, again_b = (e2e.file(name) for name in ("go", "again", "go", "again"))
    through = tls_client(e2e, pki, port, top_libdir, ["/items/3", "/items/5"], go_a, again_a)
    direct = tls_client(e2e, pki, port, overlay.below / LIBDIR, ["/items/7"], go_b, again_b)
    for peer, through_overlay in ((server, True), (through, True), (direct, False)):
        wait_mapped(peer, overlay.libssl(through_overlay=through_overlay))
    sensor = start_sensor(e2e)
    for client, go, again in ((through, go_a, again_a), (direct, go_b, again_b)):
        go.touch()  # one connection, then another
        wait_until(answered(client), 20, "a first answer", describe=client.stderr)
        again.touch()
        client.finish()

    records = wait_stable(sensor, 2 * (4 + 2))
    connections = sensor.finish()
    assert_probed_once(sensor, overlay)

    for client, sent in ((through, ["/items/3", "/items/5"]), (direct, ["/items/7"])):
        ids = egress_ids(connections, client.pid, port)
        assert len(ids) == 2, connections
        mine = [r for r in records if r["process"]["pid"] == client.pid]
        expected = [
            ("GET", path, 200, body_bytes(int(path.rsplit("/", 1)[1]))) for path in sent * 2
        ]
        assert [transaction(r) for r in mine] == expected
        assert [r["connection_id"] for r in mine] == [ids[0]] * len(sent) + [ids[1]] * len(sent)
        assert {r["direction"] for r in mine} == {"egress"}
        assert {r["capture_source"] for r in mine} == {"openssl"}
    # The same requests, once each, at the server's end of its four connections.
    served = [r for r in records if r["process"]["pid"] == server.pid]
    sent = ["/items/3", "/items/5"] * 2 + ["/items/7"] * 2
    assert sorted(transaction(r) for r in served) == sorted(
        ("GET", path, 200, body_bytes(int(path.rsplit("/", 1)[1]))) for path in sent
    )
    assert {r["direction"] for r in served} == {"ingress"}
    accepted = ingress_ids(connections, server.pid, port)
    assert len(accepted) == 4 and {r["connection_id"] for r in served} == accepted


def test_private_root_on_overlay(overlay: OverlayRoot, e2e: Lab, pki: dict[str, Path]) -> None:
    """A server whose root is the overlay (as a container's), found at start; curl in
    another such root, and a python client that loads the layer's libssl directly."""
    serve = ["/usr/bin/openssl", "s_server", "-accept", "127.0.0.1:0", "-HTTP"]
    serve += ["-cert", f"/pki/{pki['cert'].name}", "-key", f"/pki/{pki['key'].name}"]
    server = e2e.spawn(in_root(overlay, *serve), cgroup=e2e.cgroup, stem="s_server")

    def listening() -> int | None:
        for line in server.lines():
            if line.startswith("ACCEPT "):
                return int(line.rsplit(":", 1)[1])
        return None

    port = wait_until(listening, 20, "s_server's port", describe=server.stderr)
    wait_mapped(server, overlay.libssl(through_overlay=True))
    go, again = e2e.file("go"), e2e.file("again")
    direct = tls_client(e2e, pki, port, overlay.below / LIBDIR, ["/alpha"], go, again)
    wait_mapped(direct, overlay.libssl(through_overlay=False))
    sensor = start_sensor(e2e)

    # curl starts after the sensor, from the file already probed: covered from its start.
    fetch = ["/usr/bin/curl", "-sS", "--noproxy", "*", "--cacert", f"/pki/{pki['ca'].name}"]
    fetch += [f"https://127.0.0.1:{port}/{name}" for name in PAGES]
    curl = e2e.spawn(in_root(overlay, *fetch), cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    go.touch()
    wait_until(answered(direct), 20, "a first answer", describe=direct.stderr)
    again.touch()
    direct.finish()

    records = wait_stable(sensor, 2 * (len(PAGES) + 2))
    connections = sensor.finish()
    assert_probed_once(sensor, overlay)

    pages = [("GET", f"/{name}", status, body) for name, (status, body) in PAGES.items()]
    for client, expected in ((curl, pages), (direct, [pages[0]] * 2)):
        mine = [r for r in records if r["process"]["pid"] == client.pid]
        assert [transaction(r) for r in mine] == expected
        assert [r["connection_id"] for r in mine] == egress_ids(connections, client.pid, port)
        assert {r["direction"] for r in mine} == {"egress"}
    served = [r for r in records if r["process"]["pid"] == server.pid]
    assert sorted(transaction(r) for r in served) == sorted([*pages, pages[0], pages[0]])
    assert {r["connection_id"] for r in served} == ingress_ids(connections, server.pid, port)
    assert {r["capture_source"] for r in records} == {"openssl"}


def test_layer_probed_first_covers_the_overlay(
    overlay: OverlayRoot, e2e: Lab, pki: dict[str, Path]
) -> None:
    """The only process mapping the copy at start maps it from the layer, so the probes go
    there; curl, started later in a root on the overlay, maps it through the overlay: the
    same file, so it is not probed again and curl is covered from its first call."""
    server = e2e.spawn(
        [PYTHON, str(TLS_PEER), "server", "--cert", str(pki["cert"]), "--key", str(pki["key"])],
        cgroup=e2e.cgroup,
        stem="server",
        env={"LD_LIBRARY_PATH": str(overlay.below / LIBDIR)},
    )
    port = int(server.wait_message("listening")["port"])
    wait_mapped(server, overlay.libssl(through_overlay=False))
    sensor = start_sensor(e2e)

    paths = ["/items/11", "/items/2", "/items/5"]
    fetch = ["/usr/bin/curl", "-sS", "--noproxy", "*", "--http1.1"]
    fetch += ["--cacert", f"/pki/{pki['ca'].name}", *["-o", "/srv/out"] * len(paths)]
    fetch += [f"https://127.0.0.1:{port}{path}" for path in paths]
    curl = e2e.spawn(in_root(overlay, *fetch), cgroup=e2e.cgroup, stem="curl")
    curl.finish()

    records = wait_stable(sensor, 2 * len(paths))
    connections = sensor.finish()
    assert assert_probed_once(sensor, overlay).endswith(str(overlay.libssl(through_overlay=False)))

    expected = [("GET", path, 200, body_bytes(int(path.rsplit("/", 1)[1]))) for path in paths]
    (conn_id,) = egress_ids(connections, curl.pid, port)  # one keep-alive connection
    (accepted,) = ingress_ids(connections, server.pid, port)
    for pid, direction, conn in ((curl.pid, "egress", conn_id), (server.pid, "ingress", accepted)):
        mine = [r for r in records if r["process"]["pid"] == pid]
        assert [transaction(r) for r in mine] == expected
        assert {(r["direction"], r["connection_id"]) for r in mine} == {(direction, conn)}
