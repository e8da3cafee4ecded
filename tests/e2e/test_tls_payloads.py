"""TLS plaintext from the OpenSSL probes, parsed into HTTP transaction records.

Servers and clients use a certificate from a CA the suite makes (the pki fixture). The
HTTPS server is started before the sensor (it is found by the start-up scan); clients
come after, or before and wait for a go file.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    CURL,
    EXEC_HOLD,
    OPENSSL,
    PYTHON,
    TLS_PEER,
    Lab,
    Record,
    assert_well_formed,
    find_pairs,
    only_pair,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.e2e

STATIC_CLIENT_SOURCE = Path(__file__).resolve().with_name("tls_client.c")
LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")


@pytest.fixture(scope="module")
def static_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """tls_client.c linked against libssl.a and libcrypto.a: OpenSSL in the executable."""
    out = tmp_path_factory.mktemp("static") / "tls_client"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(out), str(STATIC_CLIENT_SOURCE),
         "-Wl,-Bstatic", "-lssl", "-lcrypto", "-Wl,-Bdynamic", "-ldl", "-lpthread"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    linked = subprocess.run(["ldd", str(out)], capture_output=True, text=True, check=True)
    assert "libssl" not in linked.stdout, linked.stdout
    yield out


def by_pid(records: list[Record], pid: int) -> list[Record]:
    return [r for r in records if r["process"]["pid"] == pid]


def connection_of(connections: list[Record], pid: int, **criteria: Any) -> int:
    opened, _closed = only_pair(connections, pid=pid, **criteria)
    conn_id: int = opened["connection_id"]
    return conn_id


@pytest.mark.kernels
def test_curl_https_post_both_ends(e2e: Lab, pki: dict[str, Path]) -> None:
    server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--capture-level", "full"])
    url = f"https://127.0.0.1:{port}/v1/echo?x=1"
    argv = [CURL, "-sS", "--noproxy", "*", "--http1.1", "--cacert", str(pki["ca"])]
    argv += ["-H", "Authorization: Bearer s3cr3t", "-d", "hello tls", url]
    curl = e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 2, what="two http records")
    connections = sensor.finish()
    records = sensor.http_records()

    (client,) = by_pid(records, curl.pid)
    (served,) = by_pid(records, server.pid)
    assert client["connection_id"] == connection_of(
        connections, curl.pid, direction="egress", remote_port=port
    )
    assert served["connection_id"] == connection_of(
        connections, server.pid, direction="ingress", local_port=port
    )
    for record, direction in ((client, "egress"), (served, "ingress")):
        assert record["direction"] == direction
        assert record["capture_source"] == "openssl"
        request, response = record["request"], record["response"]
        assert (request["method"], request["path"]) == ("POST", "/v1/echo?x=1")
        assert request["url"] == f"https://127.0.0.1:{port}/v1/echo?x=1"
        assert request["protocol"] == "HTTP/1.1"
        assert request["user_agent"].startswith("curl/")
        assert ["Authorization", "Bearer [REDACTED]"] in request["headers"]
        assert base64.b64decode(request["body"]) == b"hello tls"
        assert response["status"] == 201
        assert response["content_type"] == "text/plain"
        assert ["Set-Cookie", "[REDACTED]"] in response["headers"]
        assert base64.b64decode(response["body"]) == b"echo:hello tls"
    assert (client["bytes_sent"], client["bytes_received"]) == (9, 14)
    # The ciphertext is not parsed as well: exactly one transaction per end.
    assert len(records) == 2


def test_curl_http2_over_tls(e2e: Lab, pki: dict[str, Path]) -> None:
    server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--capture-level", "full"])
    base = f"https://127.0.0.1:{port}"
    argv = [CURL, "-sS", "--noproxy", "*", "--http2", "--cacert", str(pki["ca"]), "-o", "/dev/null"]
    argv += [f"{base}/items/100", "-o", "/dev/null", f"{base}/items/7"]
    curl = e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 4, what="four http records")
    connections = sensor.finish()
    records = sensor.http_records()

    client = by_pid(records, curl.pid)
    served = by_pid(records, server.pid)
    conn_id = connection_of(connections, curl.pid, direction="egress", remote_port=port)
    for side in (client, served):
        assert [r["request"]["path"] for r in side] == ["/items/100", "/items/7"]
        for record, size in zip(side, (100, 7), strict=True):
            assert record["request"]["protocol"] == "HTTP/2"
            assert record["request"]["url"] == f"{base}/items/{size}"
            assert record["response"]["status"] == 200
            assert base64.b64decode(record["response"]["body"]) == bytes(
                i % 251 for i in range(size)
            )
            assert record["stream_id"] in (1, 3)
    assert {r["connection_id"] for r in client} == {conn_id}


@pytest.mark.kernels
def test_python_client_started_before_the_sensor(e2e: Lab, pki: dict[str, Path]) -> None:
    """http.client uses SSL_write_ex/SSL_read_ex; keep-alive requests stay in order."""
    _server, port = start_server(e2e, pki)
    go = e2e.file("go")
    argv = [PYTHON, str(TLS_PEER), "client", "--port", str(port), "--ca", str(pki["ca"])]
    argv += ["--go", str(go), "--paths", "/items/10", "/items/20", "/items/30"]
    client = e2e.spawn(argv, cgroup=e2e.cgroup, stem="client")
    sensor = e2e.sensor(extra=["--direction", "egress", "--capture-level", "headers"])
    go.touch()
    client.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 3, what="three http records")
    connections = sensor.finish()
    records = sensor.http_records()

    assert [r["request"]["path"] for r in records] == ["/items/10", "/items/20", "/items/30"]
    assert [r["bytes_received"] for r in records] == [10, 20, 30]
    assert {r["connection_id"] for r in records} == {
        connection_of(connections, client.pid, remote_port=port)
    }
    for record in records:
        assert record["process"]["pid"] == client.pid
        assert record["capture_source"] == "openssl"
        assert ["X-Api-Key", "[REDACTED]"] in record["request"]["headers"]


def test_openssl_s_client_hand_written_request(e2e: Lab, pki: dict[str, Path]) -> None:
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--direction", "egress", "--capture-level", "full"])
    request = (
        f"GET /items/5 HTTP/1.1\\r\\nHost: 127.0.0.1:{port}\\r\\nConnection: close\\r\\n\\r\\n"
    )
    script = (
        f"printf '{request}' | {OPENSSL} s_client -quiet "
        f"-CAfile {pki['ca']} -connect 127.0.0.1:{port} > /dev/null"
    )
    shell = e2e.spawn(["/bin/sh", "-c", script], cgroup=e2e.cgroup, stem="s_client")
    shell.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 1, what="an http record")
    connections = sensor.finish()
    (record,) = sensor.http_records()

    assert record["process"]["exe"] == OPENSSL
    assert record["request"]["method"] == "GET"
    assert record["request"]["path"] == "/items/5"
    assert record["request"]["headers"] == [
        ["Host", f"127.0.0.1:{port}"],
        ["Connection", "close"],
    ]
    assert record["response"]["status"] == 200
    assert base64.b64decode(record["response"]["body"]) == bytes(range(5))
    pid = record["process"]["pid"]
    assert record["connection_id"] == connection_of(connections, pid, remote_port=port)


def test_static_libssl_executable(e2e: Lab, pki: dict[str, Path], static_client: Path) -> None:
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--direction", "egress", "--capture-level", "full", *EXEC_HOLD])
    go = e2e.file("go")
    go.touch()  # talks at once: OpenSSL is in the executable itself, probed at its exec
    argv = [str(static_client), str(port), str(pki["ca"]), "/items/33", str(go)]
    client = e2e.spawn(argv, cgroup=e2e.cgroup, stem="static-client")
    done = client.wait_message("done")
    client.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 1, what="an http record")
    connections = sensor.finish()
    (record,) = sensor.http_records()

    assert record["process"]["pid"] == client.pid
    assert record["process"]["exe"] == str(static_client)
    assert record["request"]["user_agent"] == "static-client"
    assert record["request"]["path"] == "/items/33"
    assert base64.b64decode(record["response"]["body"]) == bytes(i % 251 for i in range(33))
    assert record["connection_id"] == connection_of(connections, client.pid, remote_port=port)
    assert done["received"] > 33


@pytest.mark.parametrize(("cap", "truncated"), [(2 << 20, False), (1000, True)])
def test_large_tls_body_whole_or_truncated(
    e2e: Lab, pki: dict[str, Path], cap: int, truncated: bool
) -> None:
    size = (1 << 20) + 17
    server, port = start_server(e2e, pki)
    extra = ["--capture-level", "full", "--max-body-bytes", str(cap)]
    sensor = e2e.sensor(extra=extra)
    url = f"https://127.0.0.1:{port}/items/{size}"
    argv = [CURL, "-sS", "--noproxy", "*", "--http1.1", "--cacert", str(pki["ca"])]
    curl = e2e.spawn([*argv, "-o", "/dev/null", url], cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 2, what="two http records")
    sensor.finish()
    records = sensor.http_records()

    expected = bytes(i % 251 for i in range(size))
    for record in (*by_pid(records, curl.pid), *by_pid(records, server.pid)):
        body = base64.b64decode(record["response"]["body"])
        assert record["response"]["body_size"] == size
        assert record["truncated"]["response_body"] is truncated
        assert body == expected[: min(cap, size)]
    assert len(records) == 2


def test_library_loaded_after_start(e2e: Lab, pki: dict[str, Path], tmp_path: Path) -> None:
    """A libssl no process had mapped when the sensor started (a private copy here, as in
    a container) is found when its process opens a connection, and probed from then on."""
    private = tmp_path / "lib"
    private.mkdir()
    for name in ("libssl.so.3", "libcrypto.so.3"):
        shutil.copy(LIBSSL.with_name(name), private / name)
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--direction", "egress", "--capture-level", "headers"])
    again = e2e.file("again")
    argv = [PYTHON, str(TLS_PEER), "client", "--port", str(port), "--ca", str(pki["ca"])]
    argv += ["--again", str(again), "--paths", "/items/1"]
    client = e2e.spawn(
        argv, cgroup=e2e.cgroup, stem="client", env={"LD_LIBRARY_PATH": str(private)}
    )
    client.wait_message("response")
    sensor.wait_log(f"openssl probes attached to {private / 'libssl.so.3'}")
    again.touch()
    client.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 1, what="an http record")
    stats = sensor.stop()
    connections = sensor.records()
    records = sensor.http_records()
    assert_well_formed(connections)
    # The probes reach the first connection while it runs (its library appeared after
    # start): they may join it between its request and its response, and that lost
    # request is counted as one parser error. Nothing else may be lost.
    drops = {name: n for name, n in stats["drops"].items() if n}
    assert drops in ({}, {"http_parser_errors": 1}), stats

    opens = [opened for opened, _ in find_pairs(connections, pid=client.pid, remote_port=port)]
    assert len(opens) == 2
    assert records[-1]["connection_id"] == opens[-1]["connection_id"]
    assert records[-1]["request"]["path"] == "/items/1"
    assert records[-1]["process"]["pid"] == client.pid


def test_per_process_probes_follow_a_fork(e2e: Lab, pki: dict[str, Path]) -> None:
    """--tls-attach process: the probes go into the traced processes only (a forked child
    gets its own from the fork event); an untraced client of the same library gets none."""
    server, port = start_server(e2e, pki)
    go, child_go = e2e.file("go"), e2e.file("child-go")
    argv = [PYTHON, str(TLS_PEER), "client", "--port", str(port), "--ca", str(pki["ca"])]
    argv += ["--go", str(go), "--fork", "--child-go", str(child_go), "--paths", "/items/4"]
    parent = e2e.spawn(argv, cgroup=e2e.cgroup, stem="client")
    sensor = e2e.sensor(
        "--pid", str(parent.pid), extra=["--capture-level", "full", "--tls-attach", "process"]
    )
    # An untraced HTTPS client meanwhile, on the same libssl.
    curl_argv = [CURL, "-sS", "--noproxy", "*", "--cacert", str(pki["ca"]), "-o", "/dev/null"]
    e2e.spawn([*curl_argv, f"https://127.0.0.1:{port}/items/9"], cgroup=None, stem="curl").finish()
    go.touch()
    child = int(wait_until(lambda: parent.messages("child") or None, 10, "the child")[0]["pid"])
    # Probes reach a child once its fork event is handled: calls it makes in the first
    # milliseconds after fork() can be missed (docs/tls.md), so the child waits for them.
    sensor.wait_log(f"(pid {child})")
    child_go.touch()
    parent.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 1, what="an http record")
    connections = sensor.finish()
    (record,) = sensor.http_records()

    assert record["process"]["pid"] == child
    assert record["request"]["path"] == "/items/4"
    assert base64.b64decode(record["response"]["body"]) == bytes(range(4))
    assert record["connection_id"] == connection_of(connections, child, remote_port=port)
    assert sensor.stats is not None
    probed = {entry["pid"] for entry in sensor.stats["tls"]["attached"]}
    assert probed == {parent.pid, child}, sensor.stats["tls"]
    assert server.pid not in probed


@pytest.mark.parametrize("probes", ["gotls", None], ids=["gotls-only", "default"])
def test_tls_probes_switch_openssl_off(e2e: Lab, pki: dict[str, Path], probes: str | None) -> None:
    """--tls-probes gotls: curl's HTTPS connection is reported, its plaintext is not (the
    openssl plug-in is off); by default the same request gives openssl http records."""
    server, port = start_server(e2e, pki)
    extra = ["--capture-level", "full", *(["--tls-probes", probes] if probes else [])]
    sensor = e2e.sensor(extra=extra)
    argv = [CURL, "-sS", "--noproxy", "*", "--http1.1", "--cacert", str(pki["ca"])]
    argv += ["-o", "/dev/null", f"https://127.0.0.1:{port}/items/5"]
    curl = e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    sensor.wait_for_closed(pid=curl.pid, direction="egress", remote_port=port)
    if probes is None:
        sensor.wait_for(lambda _r: len(sensor.http_records()) >= 2, what="two http records")
    connections = sensor.finish()
    records = sensor.http_records()

    conn_id = connection_of(connections, curl.pid, direction="egress", remote_port=port)
    assert sensor.stats is not None
    attached = sensor.stats["tls"]["attached"]
    if probes == "gotls":
        assert records == [], records
        assert all(entry["placement"] == "go" for entry in attached), attached
        return
    (client,) = by_pid(records, curl.pid)
    (served,) = by_pid(records, server.pid)
    assert client["connection_id"] == conn_id
    for record in (client, served):
        assert record["capture_source"] == "openssl"
        assert record["request"]["path"] == "/items/5"
        assert record["response"]["status"] == 200


def test_large_tls_upload_past_the_body_cap_has_its_exact_size(
    e2e: Lab, pki: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20 MB TLS body both ways with --max-body-bytes 1024: body_size exact, 1 KiB kept,
    the transaction complete, every plaintext byte accounted for (TLS plaintext is copied
    whole: docs/http-records.md says why)."""
    monkeypatch.setenv("FLOWTAP_RING_BUFFER_BYTES", str(64 << 20))  # as in the plain test
    size = 20 << 20
    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(i % 251 for i in range(size)))
    _server, port = start_server(e2e, pki)
    extra = ["--direction", "egress", "--capture-level", "full", "--max-body-bytes", "1024"]
    sensor = e2e.sensor(extra=extra)
    url = f"https://127.0.0.1:{port}/v1/echo"
    argv = [CURL, "-sS", "--noproxy", "*", "--http1.1", "--cacert", str(pki["ca"]), "-H", "Expect:"]
    argv += ["--data-binary", f"@{upload}", "-o", "/dev/null", url]
    curl = e2e.spawn(argv, cgroup=e2e.cgroup, stem="curl")
    curl.finish()
    sensor.wait_for(lambda _r: len(sensor.http_records()) >= 1, what="an http record")
    stats = sensor.stop()
    (record,) = sensor.http_records()

    assert (record["capture_source"], record["error"]) == ("openssl", None), record
    request, response = record["request"], record["response"]
    assert (request["method"], request["body_size"]) == ("POST", size)
    assert base64.b64decode(request["body"]) == upload.read_bytes()[:1024]
    assert response["status"] == 201
    assert response["body_size"] == size + len(b"echo:")
    lost = {name: n for name, n in stats["drops"].items() if n}
    if "bounded build" in stats["kernel"]["connections"]["detail"]:
        lost.pop("payload_gaps", None)  # older kernels copy up to 512 KiB of a TLS call
    assert lost == {}, stats
    assert stats["payload_bytes_skipped"] == 0, stats
    moved = size + size + len(b"echo:")  # plaintext bodies, and the heads besides
    accounted = (
        stats["payload_bytes_copied"] + stats["payload_bytes_skipped"] + stats["payload_bytes_lost"]
    )
    assert moved < accounted < moved + 4096, stats
