"""Go crypto/tls plaintext: a Go HTTPS client and server, built here from
tests/e2e/go/tlspeer.go, with and without symbols (-ldflags=-s -w)."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import CURL, EXEC_HOLD, PYTHON, TLS_PEER, Lab, Record, Sensor, only_pair, start_server

pytestmark = pytest.mark.e2e

GO_SOURCE = Path(__file__).resolve().with_name("go") / "tlspeer.go"
GO = "/usr/bin/go"


def build_go_peers(out: Path) -> dict[str, Path]:
    """tlspeer built twice into out: with symbols, and stripped."""
    env = {
        **os.environ,
        "GOCACHE": str(out / "cache"),
        "GOPATH": str(out / "gopath"),
        "GO111MODULE": "off",
        "CGO_ENABLED": "0",
    }
    built = {}
    for name, flags in (("symbols", []), ("stripped", ["-ldflags=-s -w"])):
        binary = out / f"tlspeer-{name}"
        subprocess.run(
            [GO, "build", *flags, "-o", str(binary), str(GO_SOURCE)],
            check=True,
            capture_output=True,
            env=env,
            timeout=300,
        )
        built[name] = binary
    return built


@pytest.fixture(scope="module")
def go_peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """tlspeer built twice: with symbols, and stripped. $FLOWTAP_TEST_GO_PEERS names a
    directory where build_go_peers() has put them already: the kernel matrix builds them on
    the host, as compiling under qemu's emulation takes minutes (tests/kernels)."""
    prebuilt = os.environ.get("FLOWTAP_TEST_GO_PEERS")
    if prebuilt:
        built = {name: Path(prebuilt) / f"tlspeer-{name}" for name in ("symbols", "stripped")}
        missing = [str(path) for path in built.values() if not path.exists()]
        assert not missing, f"FLOWTAP_TEST_GO_PEERS: {missing} missing"
        yield built
        return
    yield build_go_peers(tmp_path_factory.mktemp("go"))


def go_records(records: list[Record], pid: int) -> list[Record]:
    return [r for r in records if r["process"]["pid"] == pid]


@pytest.mark.parametrize(
    ("build", "proto"),
    [
        ("symbols", "h1"),
        pytest.param("symbols", "h2", marks=pytest.mark.kernels),
        ("stripped", "h1"),
        ("stripped", "h2"),
    ],
)
def test_go_client(
    e2e: Lab, pki: dict[str, Path], go_peers: dict[str, Path], build: str, proto: str
) -> None:
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--direction", "egress", "--capture-level", "full", *EXEC_HOLD])
    go = e2e.file("go")
    go.touch()  # started after the sensor, talking at once: probed at its exec
    binary = go_peers[build]
    url = f"https://127.0.0.1:{port}/items/33"
    client = e2e.spawn(
        [str(binary), "client", str(pki["ca"]), url, "3", proto, str(go)],
        cgroup=e2e.cgroup,
        stem="go-client",
    )
    client.wait_message("done")
    client.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 3, what="three http records")
    connections = sensor.finish()
    records = go_records(sensor.http_records(), client.pid)

    opened, _closed = only_pair(connections, pid=client.pid, remote_port=port)
    assert len(records) == 3
    for record in records:
        assert record["capture_source"] == "gotls"
        assert record["connection_id"] == opened["connection_id"]
        assert record["request"]["method"] == "GET"
        assert record["request"]["url"] == url
        assert record["request"]["protocol"] == ("HTTP/2" if proto == "h2" else "HTTP/1.1")
        assert record["request"]["user_agent"] == "Go-http-client/" + (
            "2.0" if proto == "h2" else "1.1"
        )
        assert record["response"]["status"] == 200
        assert base64.b64decode(record["response"]["body"]) == bytes(range(33))
        assert record["error"] is None


@pytest.mark.parametrize(
    ("build", "curl_proto"),
    [
        ("symbols", "--http1.1"),
        ("symbols", "--http2"),
        pytest.param("stripped", "--http1.1", marks=pytest.mark.kernels),
        ("stripped", "--http2"),
    ],
)
def test_go_server(
    e2e: Lab, pki: dict[str, Path], go_peers: dict[str, Path], build: str, curl_proto: str
) -> None:
    server = e2e.spawn(
        [str(go_peers[build]), "server", str(pki["cert"]), str(pki["key"])],
        cgroup=e2e.cgroup,
        stem="go-server",
    )
    port = int(server.wait_message("listening")["port"])
    # Started before the sensor: found by the start-up scan.
    sensor = e2e.sensor(extra=["--direction", "ingress", "--capture-level", "full"])
    url = f"https://127.0.0.1:{port}/v1/echo"
    argv = [CURL, "-sS", "--noproxy", "*", curl_proto, "--cacert", str(pki["ca"])]
    curl = e2e.spawn([*argv, "-d", "hello go", url], cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 1, what="an http record")
    connections = sensor.finish()
    (record,) = go_records(sensor.http_records(), server.pid)

    opened, _closed = only_pair(connections, pid=server.pid, local_port=port)
    assert record["connection_id"] == opened["connection_id"]
    assert record["direction"] == "ingress"
    assert record["capture_source"] == "gotls"
    request, response = record["request"], record["response"]
    assert (request["method"], request["path"]) == ("POST", "/v1/echo")
    assert request["protocol"] == ("HTTP/2" if curl_proto == "--http2" else "HTTP/1.1")
    assert base64.b64decode(request["body"]) == b"hello go"
    assert response["status"] == 201
    assert base64.b64decode(response["body"]) == b"echo:hello go"


def test_python_client_is_not_go(e2e: Lab, pki: dict[str, Path]) -> None:
    """An OpenSSL client next to Go programs keeps capture_source openssl."""
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--direction", "egress", "--capture-level", "summary"])
    argv = [PYTHON, str(TLS_PEER), "client", "--port", str(port), "--ca", str(pki["ca"])]
    client = e2e.spawn([*argv, "--paths", "/items/2"], cgroup=e2e.cgroup, stem="client")
    client.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 1, what="an http record")
    sensor.finish()
    (record,) = sensor.http_records()
    assert record["capture_source"] == "openssl"


def test_go_client_survives_attach_and_detach(
    e2e: Lab, pki: dict[str, Path], go_peers: dict[str, Path]
) -> None:
    """Probes come and go three times under a Go program making HTTPS requests, each on a
    new connection: it must go on to the end with the right bodies (it checks each one
    and panics otherwise), and what each sensor saw must be whole transactions."""
    server = e2e.spawn(
        [str(go_peers["symbols"]), "server", str(pki["cert"]), str(pki["key"])],
        cgroup=e2e.cgroup,
        stem="go-server",
    )
    port = int(server.wait_message("listening")["port"])
    go, stop = e2e.file("go"), e2e.file("stop")
    go.touch()
    url = f"https://127.0.0.1:{port}/items/21"
    argv = [str(go_peers["stripped"]), "client", str(pki["ca"]), url, "1000000", "h1-new"]
    client = e2e.spawn(
        [*argv, str(go), str(stop)],
        cgroup=e2e.cgroup,
        stem="go-client",
    )
    seen: list[Record] = []
    for _ in range(3):
        sensor = e2e.sensor(extra=["--direction", "egress", "--capture-level", "full"])

        def enough(_records: list[Record], watched: Sensor = sensor) -> bool:
            return len(watched.http_records()) >= 20

        sensor.wait_for(enough, what="20 http records")
        sensor.stop()
        seen += go_records(sensor.http_records(), client.pid)
    stop.touch()
    done = client.wait_message("done")
    client.finish()

    # "A few thousand requests" at least (about 21,000 here), all answered right.
    assert done["requests"] >= 2000
    assert done["requests"] > len(seen) >= 3 * 20
    whole = [r for r in seen if r["request"] and r["response"] and r["error"] is None]
    # A sensor may start or stop in the middle of one transaction; the rest are whole.
    assert len(seen) - len(whole) <= 2 * 3, [r for r in seen if r not in whole][:3]
    for record in whole:
        assert record["request"]["path"] == "/items/21"
        assert base64.b64decode(record["response"]["body"]) == bytes(range(21))
