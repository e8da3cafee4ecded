"""Egress redirection in the kernel, without the proxy: QPOINT_STRATEGY read at exec,
connect4 rewriting to a listener of this test, SO_ORIGINAL_DST answered by getsockopt,
and who connected. Everything is attached to the test's own cgroup, through links that
are gone at the end; the destination is a test host in a namespace the test made.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from flowtap.egress.redirect import EgressRedirect
from flowtap.loader import hooks
from flowtap.loader.btf import Btf
from flowtap.loader.features import KernelFeatures
from flowtap.loader.libbpf import BpfLink, BpfObject

from .helpers import (
    BPF_OBJECT,
    EGRESS_ATTACH_TYPES,
    PYTHON,
    TIMEOUT_SCALE,
    Cgroup,
    cgroup_programs,
    child_env,
)
from .netns import TestHost, make_test_host

pytestmark = pytest.mark.e2e

UPSTREAM_PORT = 8080
SO_ORIGINAL_DST = 80
TIMEOUT_S = 10.0 * TIMEOUT_SCALE

# Connects (from a forked child when asked), prints its local port and what it received.
CLIENT = """
import os, socket, sys
host, port, fork = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fork"
if fork and os.fork() != 0:
    _, status = os.wait()
    sys.exit(os.waitstatus_to_exitcode(status))
with socket.create_connection((host, port), timeout=10) as s:
    print(os.getpid(), s.getsockname()[1], s.recv(64).decode(), flush=True)
"""

# The proxy's part, run inside the test cgroup like the sensor's proxy: for each accepted
# connection, prints its peer and what SO_ORIGINAL_DST says, then answers "proxied". A
# connection it makes to itself directly comes first: the kernel's own answer stands.
PROXY = """
import json, socket, struct, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
sys.stdin.readline()  # redirection attached
def original(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)
    except OSError as exc:
        return exc.errno
    return [socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
with socket.create_connection(server.getsockname()):
    conn, peer = server.accept()
    print(json.dumps({"peer": peer, "original": original(conn)}), flush=True)
    conn.close()
for _ in range(int(sys.argv[1])):
    conn, peer = server.accept()
    print(json.dumps({"peer": peer, "original": original(conn)}), flush=True)
    conn.sendall(b"proxied")
    conn.close()
"""

# Answers every connection with "direct": what a client not redirected receives.
UPSTREAM = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(b"direct")
    conn.close()
"""


@pytest.fixture
def upstream() -> Iterator[TestHost]:
    with make_test_host() as host:
        server = subprocess.Popen(
            host.command([PYTHON, "-c", UPSTREAM, host.address, str(UPSTREAM_PORT)]),
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            assert server.stdout.readline() == b"ready\n"
            yield host
        finally:
            server.kill()
            server.wait()


@pytest.fixture
def strategies_source() -> Iterator[BpfObject]:
    """The socket layer's object with only its process hooks attached (the build this
    kernel takes): it reads QPOINT_STRATEGY at exec and owns the table the egress object
    shares."""
    obj = BpfObject.open(BPF_OBJECT)
    links: list[BpfLink] = []
    try:
        avoid = os.environ.get("FLOWTAP_AVOID_KERNEL_FEATURES", "")
        features = KernelFeatures.probe([name for name in avoid.split(",") if name])
        plan = hooks.plan(features, [program.name for program in obj.programs()])
        process_hooks = [
            p for p in plan.programs if p.startswith(("on_exec", "on_fork", "on_exit"))
        ]
        plan.select(obj, process_hooks.__contains__)
        btf = Btf(obj)
        config = btf.struct_layout("ft_config").pack(
            {"features": plan.feature_bits(btf), "thread_size": plan.thread_size}
        )
        obj.map(".rodata").write_initial_value(btf.variable_offset(".rodata", "cfg")[0], config)
        obj.map("events").set_max_entries(1 << 16)
        obj.load()
        links = [obj.program(name).attach() for name in process_hooks]
        yield obj
    finally:
        for link in links:
            link.destroy()
        obj.close()


def _run_client(
    host: TestHost, strategy: str | None, cgroup: Cgroup | None, fork: bool = False
) -> subprocess.Popen[str]:
    env = child_env()
    env.pop("QPOINT_STRATEGY", None)
    if fork:
        # The name far into a long environment, across the kernel's 64-byte chunks.
        env["FLOWTAP_TEST_PADDING"] = "x" * 20_001
    if strategy is not None:
        env["QPOINT_STRATEGY"] = strategy
    return subprocess.Popen(
        [PYTHON, "-c", CLIENT, host.address, str(UPSTREAM_PORT), "fork" if fork else "-"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=cgroup.preexec() if cgroup else None,
    )


def _finish(client: subprocess.Popen[str]) -> tuple[int, int, str]:
    out, _ = client.communicate(timeout=TIMEOUT_S)
    assert client.returncode == 0, out
    pid, port, reply = out.split()
    return int(pid), int(port), reply


def _accepted(proxy: subprocess.Popen[str]) -> tuple[tuple[str, int], object]:
    assert proxy.stdout is not None
    line = json.loads(proxy.stdout.readline())
    return (line["peer"][0], line["peer"][1]), line["original"]


@pytest.mark.kernels
def test_forward_processes_reach_the_proxy_with_their_original_destination(
    cgroup: Cgroup, upstream: TestHost, strategies_source: BpfObject
) -> None:
    # The proxy runs inside the cgroup, as the sensor must for SO_ORIGINAL_DST.
    proxy = subprocess.Popen(
        [PYTHON, "-c", PROXY, "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=cgroup.child("proxy").preexec(),
    )
    assert proxy.stdin is not None and proxy.stdout is not None
    redirect = EgressRedirect(
        cgroup.path, int(proxy.stdout.readline()), strategies_source.map("strategies")
    )
    try:
        assert cgroup_programs(cgroup.path) == dict.fromkeys(EGRESS_ATTACH_TYPES, 1)
        proxy.stdin.write("go\n")
        proxy.stdin.flush()
        # Not redirected, asked anyway: the kernel's own answer (no conntrack entry).
        peer, original = _accepted(proxy)
        assert original in (errno.ENOENT, errno.ENOPROTOOPT)
        assert redirect.origin(peer) is None

        for fork in (False, True):
            client = _run_client(upstream, "forward", cgroup, fork=fork)
            peer, original = _accepted(proxy)
            assert original == [upstream.address, UPSTREAM_PORT]
            origin = redirect.origin(peer)
            pid, port, reply = _finish(client)
            assert (reply, port) == ("proxied", peer[1])
            # The process that connected: a forked child inherits its parent's strategy.
            assert origin is not None
            assert (origin.address, origin.port, origin.pid) == (
                upstream.address,
                UPSTREAM_PORT,
                pid,
            )
            assert (pid != client.pid) if fork else (pid == client.pid)
        assert proxy.wait(timeout=TIMEOUT_S) == 0

        # Not redirected: no strategy, "ignore", or forward but outside the cgroup.
        for strategy, where in (("", cgroup), ("ignore", cgroup), ("forward", None)):
            client = _run_client(upstream, strategy or None, where)
            assert _finish(client)[2] == "direct"
        counters = redirect.counters()
        assert (counters["redirected"], counters["answered"]) == (2, 2)
    finally:
        redirect.close()
        proxy.kill()
        proxy.wait()
    assert cgroup_programs(cgroup.path) == {}
