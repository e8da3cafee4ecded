"""Node.js: OpenSSL linked into `node`, on memory BIOs. Its SSL calls touch no socket, so
the plaintext is tied to the socket the same thread received on just before (reads) or
sends on right after (writes); see docs/tls.md. Each test asserts exact transactions on
the connection record of that node socket (its local port, as node reports it).

Every node starts after the sensor is ready and talks at once (the exec gate probes it
first). Capture is scoped to the test's cgroup; traffic is loopback only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .helpers import (
    CURL,
    EXEC_HOLD,
    Lab,
    Peer,
    Sensor,
    body,
    connection_id,
    http_of,
    start_server,
)

NODE = shutil.which("node") or "/usr/bin/node"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(NODE).exists(), reason="node is not installed"),
]
NODE_PEER = Path(__file__).resolve().with_name("node_peer.js")
FULL = ["--capture-level", "full"]


def node(e2e: Lab, pki: dict[str, Path], *args: str) -> Peer:
    """node_peer.js in the test cgroup, trusting the test CA."""
    env = {"NODE_EXTRA_CA_CERTS": str(pki["ca"])}
    return e2e.spawn([NODE, str(NODE_PEER), *args], cgroup=e2e.cgroup, stem="node", env=env)


def sensor_first(e2e: Lab) -> Sensor:
    """A sensor on the test cgroup, ready before node starts: node is probed as it execs
    (the exec gate), and talks at once."""
    return e2e.sensor(extra=FULL + EXEC_HOLD)


def test_https_request_post_and_get(e2e: Lab, pki: dict[str, Path]) -> None:
    server, port = start_server(e2e, pki)
    sensor = sensor_first(e2e)
    go = e2e.file("go")
    go.touch()  # node talks at once
    client = node(e2e, pki, "request", f"https://127.0.0.1:{port}/v1/echo?x=1", str(go))
    posted = client.wait_message("response")
    client.wait_message("done")
    client.finish()
    records = http_of(sensor, client.pid, 2)
    connections = sensor.finish()

    assert posted["status"] == 201 and posted["body"] == "echo:hello node"
    conn_id = connection_id(
        connections, pid=client.pid, direction="egress", local_port=posted["local_port"]
    )
    post, get = records
    assert [r["connection_id"] for r in records] == [conn_id, conn_id]
    assert all(r["capture_source"] == "openssl" for r in records)
    assert (post["request"]["method"], post["request"]["path"]) == ("POST", "/v1/echo?x=1")
    assert post["request"]["url"] == f"https://127.0.0.1:{port}/v1/echo?x=1"
    assert body(post["request"]) == b"hello node"
    assert post["response"]["status"] == 201
    assert body(post["response"]) == b"echo:hello node"
    assert (get["request"]["method"], get["request"]["path"]) == ("GET", "/items/7")
    assert get["response"]["status"] == 200
    assert body(get["response"]) == bytes(range(7))
    # The server (Python, libssl) sees the same two on its end of that connection.
    served = [r for r in sensor.http_records() if r["process"]["pid"] == server.pid]
    assert [(r["request"]["method"], r["response"]["status"]) for r in served] == [
        ("POST", 201),
        ("GET", 200),
    ]


def test_fetch_undici(e2e: Lab, pki: dict[str, Path]) -> None:
    _server, port = start_server(e2e, pki)
    sensor = sensor_first(e2e)
    go = e2e.file("go")
    go.touch()  # node talks at once
    client = node(e2e, pki, "fetch", f"https://127.0.0.1:{port}/v2/fetch", str(go))
    answer = client.wait_message("response")
    client.finish()
    (record,) = http_of(sensor, client.pid, 1)
    connections = sensor.finish()

    assert answer == {"event": "response", "pid": client.pid, "status": 201,
                      "body": "echo:hello fetch"}  # fmt: skip
    assert record["connection_id"] == connection_id(
        connections, pid=client.pid, direction="egress", remote_port=port
    )
    assert (record["request"]["method"], record["request"]["path"]) == ("POST", "/v2/fetch")
    assert record["request"]["user_agent"] == "node"
    assert body(record["request"]) == b"hello fetch"
    assert record["response"]["status"] == 201
    assert body(record["response"]) == b"echo:hello fetch"


def test_node_https_server_hit_by_curl(e2e: Lab, pki: dict[str, Path]) -> None:
    """A node server started after the sensor: its first request is captured."""
    sensor = sensor_first(e2e)
    server = node(e2e, pki, "server", str(pki["cert"]), str(pki["key"]))
    port = int(server.wait_message("listening")["port"])
    argv = [CURL, "-sS", "--noproxy", "*", "--http1.1", "--cacert", str(pki["ca"])]
    argv += ["--local-port", "42000-42999", "-d", "from curl", f"https://127.0.0.1:{port}/up"]
    curl = e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    (record,) = http_of(sensor, server.pid, 1)
    connections = sensor.finish()

    (opened,) = [
        r for r in connections
        if r["event"] == "open" and r["process"]["pid"] == server.pid
        and r["direction"] == "ingress"
    ]  # fmt: skip
    assert 42000 <= opened["remote"]["port"] <= 42999
    assert record["connection_id"] == opened["connection_id"]
    assert record["direction"] == "ingress"
    assert (record["request"]["method"], record["request"]["path"]) == ("POST", "/up")
    assert record["request"]["user_agent"].startswith("curl/")
    assert body(record["request"]) == b"from curl"
    assert record["response"]["status"] == 201
    assert body(record["response"]) == b"node-echo:from curl"


def test_http2_connect(e2e: Lab, pki: dict[str, Path]) -> None:
    _server, port = start_server(e2e, pki)
    sensor = sensor_first(e2e)
    go = e2e.file("go")
    go.touch()  # node talks at once
    client = node(e2e, pki, "h2", f"https://127.0.0.1:{port}/v3/h2", str(go))
    first = client.wait_message("response")
    client.wait_message("done")
    client.finish()
    records = http_of(sensor, client.pid, 2)
    connections = sensor.finish()

    conn_id = connection_id(
        connections, pid=client.pid, direction="egress", local_port=first["local_port"]
    )
    get, post = sorted(records, key=lambda r: r["request"]["method"])
    assert [r["connection_id"] for r in records] == [conn_id, conn_id]
    assert all(r["request"]["protocol"] == "HTTP/2" for r in records)
    assert (get["request"]["path"], get["response"]["status"]) == ("/items/7", 200)
    assert body(get["response"]) == bytes(range(7))
    assert (post["request"]["path"], post["response"]["status"]) == ("/v3/h2", 201)
    assert body(post["request"]) == b"hello h2"
    assert body(post["response"]) == b"echo:hello h2"


def test_two_connections_are_not_crossed(e2e: Lab, pki: dict[str, Path]) -> None:
    """Requests on two connections at once, to two servers: each record's bodies belong
    to the connection it is on."""
    _server1, port1 = start_server(e2e, pki)
    _server2, port2 = start_server(e2e, pki)
    sensor = sensor_first(e2e)
    go = e2e.file("go")
    go.touch()  # node talks at once
    url1, url2 = f"https://127.0.0.1:{port1}/one", f"https://127.0.0.1:{port2}/two"
    client = node(e2e, pki, "two", url1, url2, str(go))
    client.wait_message("done")
    answers = client.messages("response")
    client.finish()
    records = http_of(sensor, client.pid, 10)
    connections = sensor.finish()

    ports: dict[str, set[int]] = {url1: set(), url2: set()}
    for answer in answers:
        ports[answer["url"]].add(answer["local_port"])
    assert all(len(found) == 1 for found in ports.values()), ports
    by_conn = {
        connection_id(connections, pid=client.pid, direction="egress", local_port=p): (path, tag)
        for (path, tag), (p,) in zip((("/one", b"a"), ("/two", b"b")), ports.values(), strict=True)
    }
    seen: dict[str, list[bytes]] = {"/one": [], "/two": []}
    for record in records:
        path, tag = by_conn[record["connection_id"]]
        sent = body(record["request"]) or b""
        assert record["request"]["path"] == path
        assert sent[:1] == tag
        assert body(record["response"]) == b"echo:" + sent
        seen[path].append(sent)
    assert seen == {
        "/one": [b"a%d" % i for i in range(5)],
        "/two": [b"b%d" % i for i in range(5)],
    }


def test_a_new_connection_each_time(e2e: Lab, pki: dict[str, Path]) -> None:
    """Each request on a connection of its own: node frees an SSL and allocates the next at
    the same address, and the socket it last used is closed. Every record is on its own
    connection."""
    _server, port = start_server(e2e, pki)
    sensor = sensor_first(e2e)
    go = e2e.file("go")
    go.touch()  # node talks at once
    client = node(e2e, pki, "sequential", f"https://127.0.0.1:{port}/seq", str(go))
    client.wait_message("done")
    answers = client.messages("response")
    client.finish()
    records = http_of(sensor, client.pid, 5)
    connections = sensor.finish()

    assert [a["body"] for a in answers] == [f"echo:new{i}" for i in range(5)]
    expected = [
        connection_id(connections, pid=client.pid, direction="egress", local_port=a["local_port"])
        for a in answers
    ]
    assert len(set(expected)) == 5
    assert [r["connection_id"] for r in records] == expected
    assert [body(r["request"]) for r in records] == [b"new%d" % i for i in range(5)]
