"""The egress controller end to end: `flowtap run --egress` with its redirection attached
to the test's cgroup, clients with QPOINT_STRATEGY=forward in a child cgroup, and the
upstream servers on a test host in a network namespace the test made.

The sensor runs inside the egress cgroup too (a child "sensor" cgroup), so the proxy's
SO_ORIGINAL_DST is answered by the cgroup/getsockopt program, as with the default (root).
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    CURL,
    PYTHON,
    READY_TIMEOUT_S,
    RECORD_TIMEOUT_S,
    TIMEOUT_SCALE,
    Cgroup,
    Lab,
    Peer,
    Record,
    Sensor,
    cgroup_programs,
    openssl,
    wait_until,
)
from .netns import TestHost, make_test_host

pytestmark = pytest.mark.e2e

NAME = "api.flowtap.test"
HTTP_PORT = 8080
HTTPS_PORT = 8443
NODE = "/usr/bin/node"
HEADER_TIMEOUT_S = 2.0 * TIMEOUT_SCALE
UPSTREAM = Path(__file__).resolve().with_name("egress_upstream.py")
JAVA = "/usr/bin/java"
JAVA_CLIENT = Path(__file__).resolve().with_name("java") / "EgressClient.java"


@dataclass
class Egress:
    e2e: Lab
    host: TestHost
    upstream: Peer
    sensor: Sensor
    clients: Cgroup
    trust: Path  # the proxy's CA, as written to --trust-store
    upstream_ca: Path  # the upstream's own CA (what a client that is not intercepted needs)
    proxy_port: int  # the explicit proxy's

    def client(self, argv: list[str], stem: str, env: dict[str, str] | None = None) -> Peer:
        return self.e2e.spawn(
            argv, cgroup=self.clients, stem=stem, env={"QPOINT_STRATEGY": "forward", **(env or {})}
        )

    def curl(self, *args: str, trust: Path | None = None, stem: str = "curl") -> Peer:
        argv = [
            CURL,
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            f"{NAME}:{HTTPS_PORT}:{self.host.address}",
        ]
        argv += ["--cacert", str(trust or self.trust), "-o", "-", *args]
        return self.client(argv, stem)

    def received(self) -> list[dict[str, Any]]:
        return self.upstream.messages("request")


def _pki(d: Path, address: str, address6: str) -> dict[str, Path]:
    """The upstream's CA and a certificate for NAME and the test host's address."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
            "-days", "2", "-subj", "/CN=flowtap egress test upstream CA")  # fmt: skip
    openssl("req", *ec, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
            "-subj", f"/CN={NAME}")  # fmt: skip
    (d / "san.ext").write_text(f"subjectAltName=DNS:{NAME},IP:{address},IP:{address6}\n")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"))  # fmt: skip
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@pytest.fixture
def egress(e2e: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Egress]:
    with make_test_host() as host:
        pki_dir = tmp_path / "upstream-pki"
        pki_dir.mkdir()
        pki = _pki(pki_dir, host.address, host.address6)
        upstream = e2e.spawn(
            host.command(
                [
                    PYTHON,
                    str(UPSTREAM),
                    "--host",
                    host.address,
                    "--host6",
                    host.address6,
                    "--cert",
                    str(pki["cert"]),
                    "--key",
                    str(pki["key"]),
                ]
            ),
            cgroup=None,
            stem="upstream",
        )
        upstream.wait_message("listening")
        clients = e2e.cgroup.child("clients")
        trust = tmp_path / "trust"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            proxy_port = probe.getsockname()[1]
        sensor = e2e.sensor(
            "--cgroup",
            str(clients.path),
            extra=[
                "--egress",
                "--egress-cgroup",
                str(e2e.cgroup.path),
                "--trust-store",
                str(trust),
                "--state-dir",
                str(tmp_path / "state"),
                "--upstream-ca-file",
                str(pki["ca"]),
                "--proxy-port",
                str(proxy_port),
                "--proxy-header-timeout",
                str(HEADER_TIMEOUT_S),
                "--capture-level",
                "full",
            ],
            # Inside the egress cgroup, as under the default (the root), unless the test
            # asks for the other case: the proxy then reads the kernel's table itself.
            cgroup=None
            if request.node.get_closest_marker("sensor_outside")
            else e2e.cgroup.child("sensor"),
            wait=False,
        )
        # The proxy's TLS stack is the slowest import of a start: in a kernel-matrix guest's
        # first test (nothing cached yet, under emulation) the whole start passed 80 s.
        sensor.wait_ready(READY_TIMEOUT_S * 2)
        try:
            yield Egress(
                e2e,
                host,
                upstream,
                sensor,
                clients,
                trust / "flowtap-ca.pem",
                pki["ca"],
                proxy_port,
            )
        finally:
            sensor.stop()
            upstream.kill()
    # Everything the sensor attached hung on its links: the cgroup holds nothing now.
    shown = e2e.cgroup.path.exists() and cgroup_programs(e2e.cgroup.path)
    assert not shown, shown


def _http(sensor: Sensor, **request: Any) -> Record:
    """The one egress http record whose request has these fields (bounded wait)."""

    def found() -> Record | None:
        hits = [
            r
            for r in sensor.all_records()
            if r.get("type") == "http"
            and r["capture_source"] == "egress"
            and r["request"]
            and all(r["request"].get(k) == v for k, v in request.items())
        ]
        assert len(hits) <= 1, hits
        return hits[0] if hits else None

    return wait_until(found, RECORD_TIMEOUT_S, f"an http record of {request}", interval=0.05,
                      describe=sensor.describe)  # fmt: skip


def _egress_close(records: list[Record]) -> Record:
    """The one close record of a proxied connection."""
    closes = [r for r in records if r.get("capture_source") == "egress" and r["event"] == "close"]
    assert len(closes) == 1, closes
    return closes[0]


def _body(part: Record) -> bytes:
    return base64.b64decode(part["body"])


def test_https_and_http_through_the_proxy(egress: Egress) -> None:
    """curl (HTTP/1.1 POST and HTTP/2), Python urllib over plain HTTP, and node https:
    exact records attributed to each client, and the upstream received what was sent."""
    post = egress.curl("--http1.1", "-d", "hello body", "-H", "Authorization: Bearer s3cret",
                       f"https://{NAME}:{HTTPS_PORT}/submit?x=1", stem="curl-post")  # fmt: skip
    post.finish()
    record = _http(egress.sensor, method="POST", path="/submit?x=1")
    assert record["process"]["pid"] == post.pid
    assert record["process"]["exe"] == CURL
    assert record["direction"] == "egress"
    assert record["request"]["authority"] == f"{NAME}:{HTTPS_PORT}"
    assert _body(record["request"]) == b"hello body"
    assert record["response"]["status"] == 201
    assert _body(record["response"]) == b"echo:hello body"
    headers = dict(record["request"]["headers"])
    assert headers["Authorization"] == "Bearer [REDACTED]"
    # The upstream got the request itself, credentials included (only records redact).
    raw = base64.b64decode(egress.received()[0]["raw"])
    assert raw.startswith(b"POST /submit?x=1 HTTP/1.1\r\nHost: api.flowtap.test:8443\r\n")
    assert b"\r\nAuthorization: Bearer s3cret\r\n" in raw
    assert raw.endswith(b"\r\n\r\nhello body")

    h2 = egress.curl("--http2", f"https://{NAME}:{HTTPS_PORT}/over/h2", stem="curl-h2")
    h2.finish()
    record = _http(egress.sensor, method="GET", path="/over/h2")
    assert record["request"]["protocol"] == "HTTP/2"
    assert (record["response"]["status"], _body(record["response"])) == (200, b"hello /over/h2")
    assert record["process"]["pid"] == h2.pid
    assert egress.received()[-1]["h2"] is True

    # Python trusts the proxy's CA through SSL_CERT_FILE; no SNI (an address), so the
    # proxy's leaf certificate is for the address.
    url = f"https://{egress.host.address}:{HTTPS_PORT}/py/tls"
    script = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=10).read()"
    urllib_client = egress.client(
        [PYTHON, "-c", script], stem="urllib", env={"SSL_CERT_FILE": str(egress.trust)}
    )
    urllib_client.finish()
    record = _http(egress.sensor, method="GET", path="/py/tls")
    assert record["process"]["pid"] == urllib_client.pid
    assert (record["response"]["status"], _body(record["response"])) == (200, b"hello /py/tls")

    script = (
        "import http.client;"
        f"c = http.client.HTTPConnection({egress.host.address!r}, {HTTP_PORT}, timeout=10);"
        "c.request('DELETE', '/py/plain', headers={'X-Api-Key': 'k1'}); c.getresponse().read()"
    )
    plain = egress.client([PYTHON, "-c", script], stem="http-client")
    plain.finish()
    record = _http(egress.sensor, method="DELETE", path="/py/plain")
    assert record["process"]["pid"] == plain.pid
    assert dict(record["request"]["headers"])["X-Api-Key"] == "[REDACTED]"

    # requests trusts the proxy's CA through REQUESTS_CA_BUNDLE (its own certifi otherwise).
    script = (
        "import requests;"
        f"r = requests.post('https://{egress.host.address}:{HTTPS_PORT}/py/requests',"
        " json={'n': 1}, timeout=10);"
        "r.raise_for_status()"
    )
    req = egress.client(
        [PYTHON, "-c", script],
        stem="requests",
        env={"REQUESTS_CA_BUNDLE": str(egress.trust)},
    )
    req.finish()
    record = _http(egress.sensor, method="POST", path="/py/requests")
    assert record["process"]["pid"] == req.pid
    assert _body(record["request"]) == b'{"n": 1}'
    assert _body(record["response"]) == b'echo:{"n": 1}'

    node_script = (
        "const https = require('https');"
        f"const req = https.request({{host: '{egress.host.address}', port: {HTTPS_PORT},"
        f" servername: '{NAME}', path: '/from/node', method: 'PUT',"
        " headers: {'Content-Length': 4}}, (res) => { res.resume();"
        " res.on('end', () => process.exit(res.statusCode === 200 ? 0 : 1)); });"
        "req.end('abcd');"
    )
    node = egress.client([NODE, "-e", node_script], stem="node",
                         env={"NODE_EXTRA_CA_CERTS": str(egress.trust)})  # fmt: skip
    node.finish()
    record = _http(egress.sensor, method="PUT", path="/from/node")
    assert record["process"]["pid"] == node.pid
    assert _body(record["request"]) == b"abcd"

    records = egress.sensor.finish()
    closes = [
        r for r in records if r.get("capture_source") == "egress" and r.get("event") == "close"
    ]
    by_pid = {r["process"]["pid"]: r for r in closes}
    assert by_pid[post.pid]["remote"] == {"ip": egress.host.address, "port": HTTPS_PORT}
    assert by_pid[post.pid]["sni"] == NAME
    assert by_pid[post.pid]["egress"]["outcome"] == "intercepted"
    assert by_pid[h2.pid]["egress"]["alpn"] == "h2"
    assert by_pid[urllib_client.pid]["remote"] == {"ip": egress.host.address, "port": HTTPS_PORT}
    assert by_pid[urllib_client.pid]["sni"] is None
    assert by_pid[plain.pid]["egress"] == {
        "mode": "transparent",
        "outcome": "intercepted",
        "tls": False,
        "alpn": None,
        "detail": None,
    }
    assert len(egress.received()) == 6


def test_a_client_that_rejects_the_ca_is_passed_through_afterwards(egress: Egress) -> None:
    """curl does not trust the proxy's CA and fails, as with any MITM; its alert makes
    that destination pass through for that process only: another curl is intercepted
    (and fails) again, while a process that rejected the CA once passes through on its
    next connection, reported with its SNI."""
    url = f"https://{NAME}:{HTTPS_PORT}/pinned"
    first = egress.curl(url, trust=egress.upstream_ca, stem="curl-rejects")
    assert first.wait() == 60  # CURLE_PEER_FAILED_VERIFICATION
    other = egress.curl(url, trust=egress.upstream_ca, stem="curl-another")
    assert other.wait() == 60  # one process's rejection never changes what another gets
    # One process, two connections: rejected (OpenSSL sends unknown_ca), then passed.
    script = f"""
import socket, ssl
ctx = ssl.create_default_context(cafile={str(egress.upstream_ca)!r})
for attempt in (1, 2):
    try:
        with socket.create_connection(({egress.host.address!r}, {HTTPS_PORT}), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname={NAME!r}) as t:
                t.sendall(b"GET /pinned HTTP/1.1\\r\\nHost: {NAME}\\r\\n\\r\\n")
                print(attempt, t.recv(12).decode(), flush=True)
    except ssl.SSLCertVerificationError:
        print(attempt, "rejected", flush=True)
"""
    pinned = egress.client([PYTHON, "-c", script], stem="pinned")
    pinned.finish()
    assert pinned.lines() == ["1 rejected", "2 HTTP/1.1 200"]
    records = egress.sensor.finish()
    closes = [
        r for r in records if r.get("capture_source") == "egress" and r.get("event") == "close"
    ]
    outcomes = sorted((r["process"]["pid"], r["egress"]["outcome"]) for r in closes)
    assert outcomes == sorted(
        [
            (first.pid, "rejected"),
            (other.pid, "rejected"),
            (pinned.pid, "rejected"),
            (pinned.pid, "passthrough"),
        ]
    )
    assert all(r["sni"] == NAME for r in closes)
    assert egress.sensor.http_records() == []
    # Only the passed-through request reached the upstream (the others never got that far).
    assert len(egress.received()) == 1
    stats = json.loads(egress.sensor.stats_file.read_text())["egress"]
    assert stats["passthrough_learned_alert"] == 3 and stats["passthrough"] == 1


def test_a_second_egress_sensor_on_the_same_cgroup_is_refused(egress: Egress) -> None:
    """A second --egress on the cgroup (or on one inside it) would record nothing of what
    the first proxies: it refuses to start, naming the first sensor; the first goes on."""
    for where in (egress.e2e.cgroup.path, egress.clients.path):
        second = egress.e2e.sensor(
            "--cgroup",
            str(egress.clients.path),
            extra=["--egress", "--egress-cgroup", str(where), "--proxy-port", "0"],
            wait=False,
        )
        code = second.popen.wait(RECORD_TIMEOUT_S)
        text = second.stderr()
        assert code != 0, text
        assert f"another flowtap egress redirection already covers --egress-cgroup {where}" in (
            text
        )
        assert f"held by pid {egress.sensor.pid} (flowtap)" in text, text
        assert "Stop the other sensor first, or give each its own --egress-cgroup" in text
        assert not second.ready.exists()
    post = egress.curl("-d", "still", f"https://{NAME}:{HTTPS_PORT}/first", stem="curl")
    post.finish()
    record = _http(egress.sensor, method="POST", path="/first")
    assert record["process"]["pid"] == post.pid


def test_requests_that_smuggle_or_overflow_are_refused(egress: Egress) -> None:
    """Through the transparent path to the plain HTTP upstream: Content-Length with
    Transfer-Encoding and an oversize header section are refused by the proxy and never
    reach the upstream; a good request on a new connection still passes."""
    script = f"""
import socket, sys
def send(raw):
    with socket.create_connection(({egress.host.address!r}, {HTTP_PORT}), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\\r\\n\\r\\n" in data:
                break
        return data.split(b" ", 2)[1].decode()
smuggle = (b"POST /a HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 4\\r\\n"
           b"Transfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n")
huge = b"GET /b HTTP/1.1\\r\\nHost: x\\r\\nX-Big: " + b"a" * 70000 + b"\\r\\n\\r\\n"
good = b"GET /c HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n"
import json, os
codes = [send(smuggle), send(huge), send(good)]
print(json.dumps({{"event": "codes", "pid": os.getpid(), "codes": codes}}), flush=True)
"""
    client = egress.client([PYTHON, "-c", script], stem="smuggler")
    client.finish()
    assert client.wait_message("codes")["codes"] == ["400", "431", "200"]
    egress.sensor.finish()
    assert len(egress.received()) == 1
    raw = base64.b64decode(egress.received()[0]["raw"])
    assert raw.startswith(b"GET /c HTTP/1.1\r\n")
    stats = json.loads(egress.sensor.stats_file.read_text())["egress"]
    assert stats["refused_smuggling"] == 1
    assert stats["refused_header_too_large"] == 1
    http = egress.sensor.http_records()
    assert [r["request"]["path"] for r in http] == ["/c"]


def test_processes_without_forward_are_not_redirected(egress: Egress) -> None:
    """No QPOINT_STRATEGY: the same curl reaches the upstream directly (it must trust
    the upstream's CA), and the proxy never sees it."""
    resolve = f"{NAME}:{HTTPS_PORT}:{egress.host.address}"
    argv = [CURL, "-sS", "--max-time", "10", "--resolve", resolve, "--cacert",
            str(egress.upstream_ca), "-o", "-", f"https://{NAME}:{HTTPS_PORT}/direct"]  # fmt: skip
    direct = egress.e2e.spawn(argv, cgroup=egress.clients, stem="direct")
    direct.finish()
    records = egress.sensor.finish()
    assert not [r for r in records if r.get("capture_source") == "egress"]
    closes = [r for r in records if r.get("event") == "close" and r["process"]["pid"] == direct.pid]
    assert [r["remote"] for r in closes] == [{"ip": egress.host.address, "port": HTTPS_PORT}]
    assert len(egress.received()) == 1


def test_explicit_proxy(egress: Egress) -> None:
    """HTTPS_PROXY-style use, no redirection: curl CONNECTs through the port flowtap was
    given; the client is found from its socket, and the request is recorded."""
    url = f"https://{egress.host.address}:{HTTPS_PORT}/explicit"
    argv = [CURL, "-sS", "--max-time", "10", "--cacert", str(egress.trust), "-o", "-",
            "--proxy", f"http://127.0.0.1:{egress.proxy_port}", url]  # fmt: skip
    curl = egress.e2e.spawn(argv, cgroup=egress.clients, stem="explicit")
    curl.finish()
    record = _http(egress.sensor, method="GET", path="/explicit")
    assert record["process"]["pid"] == curl.pid
    assert record["response"]["status"] == 200
    # Not an open proxy: the test host cannot reach it through this host's address.
    script = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({egress.host.gateway!r}, {egress.proxy_port}), timeout=5)\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n"
    )
    probe = subprocess.run(
        egress.host.command([PYTHON, "-c", script]), capture_output=True, text=True, timeout=20
    )
    assert probe.stdout == "refused\n", probe

    records = egress.sensor.finish()
    close = _egress_close(records)
    assert close["egress"]["mode"] == "explicit"
    assert close["remote"] == {"ip": egress.host.address, "port": HTTPS_PORT}


def test_an_unreachable_upstream_is_answered_with_502(egress: Egress) -> None:
    """Nothing listens on the test host's port 9: the client gets a 502 from the proxy,
    which is recorded as a transaction and as a connection whose upstream failed."""
    url = f"http://{egress.host.address}:9/nowhere"
    argv = [CURL, "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", url]
    curl = egress.client(argv, stem="curl-502")
    curl.finish()
    record = _http(egress.sensor, method="GET", path="/nowhere")
    assert record["process"]["pid"] == curl.pid
    assert record["response"]["status"] == 502
    records = egress.sensor.finish()
    close = _egress_close(records)
    assert close["egress"]["outcome"] == "upstream_failed"
    assert close["status"] == "failed"
    assert "refused" in close["egress"]["detail"].lower()
    assert egress.received() == []


@pytest.mark.kernels
def test_ipv6_destinations_are_redirected_too(egress: Egress) -> None:
    """connect6: an IPv6 destination reaches the proxy's ::1 listener, SO_ORIGINAL_DST is
    answered at the IPv6 level, and the record names the IPv6 original destination."""
    url = f"https://[{egress.host.address6}]:{HTTPS_PORT}/v6"
    curl = egress.client(
        [CURL, "-sS", "--max-time", "10", "--cacert", str(egress.trust), "-o", "/dev/null", url],
        stem="curl-v6",
    )
    curl.finish()
    record = _http(egress.sensor, method="GET", path="/v6")
    assert record["process"]["pid"] == curl.pid
    assert record["response"]["status"] == 200
    records = egress.sensor.finish()
    close = _egress_close(records)
    assert close["remote"] == {"ip": egress.host.address6, "port": HTTPS_PORT}
    assert close["family"] == "ipv6"
    assert close["local"]["ip"] == "::1"
    stats = json.loads(egress.sensor.stats_file.read_text())["egress"]
    assert (stats["kernel_redirected"], stats["kernel_answered"]) == (1, 1)


@pytest.mark.kernels
def test_the_upstream_receives_the_request_byte_for_byte(egress: Egress) -> None:
    """Odd header case and order, repeated headers, a chunked body: what the client wrote
    over TLS is exactly what the upstream read."""
    sent = (
        b"PUT /exact?a=1&b=2 HTTP/1.1\r\nhost: api.flowtap.test\r\nX-Zeta: 1\r\n"
        b"x-alpha:   spaced  \r\nX-Zeta: 2\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"
    )
    script = f"""
import json, os, socket, ssl
context = ssl.create_default_context(cafile={str(egress.trust)!r})
raw = socket.create_connection(({egress.host.address!r}, {HTTPS_PORT}), timeout=10)
with context.wrap_socket(raw, server_hostname={NAME!r}) as tls:
    tls.sendall({sent!r})
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
print(json.dumps({{"event": "answer", "pid": os.getpid(), "status": answer[9:12].decode()}}))
"""
    client = egress.client([PYTHON, "-c", script], stem="exact")
    client.finish()
    assert client.wait_message("answer")["status"] == "200"
    (request,) = egress.received()
    assert base64.b64decode(request["raw"]) == sent
    record = _http(egress.sensor, method="PUT", path="/exact?a=1&b=2")
    assert _body(record["request"]) == b"hello!"
    assert [name for name, _ in record["request"]["headers"]] == [
        "host",
        "X-Zeta",
        "x-alpha",
        "X-Zeta",
        "Transfer-Encoding",
        "Connection",
    ]


def test_java_trusts_the_keystore(egress: Egress) -> None:
    """Java's own HTTP client, pointed at the JKS written to the trust store."""
    jks = egress.trust.with_name("flowtap-ca.jks")  # keytool is in debian-packages.txt
    assert jks.stat().st_mode & 0o777 == 0o644  # public: every client must read it
    # The CA's key, by contrast, is the sensor's alone, in a directory only it can enter.
    state = egress.e2e.workdir / "state"
    assert (state / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    url = f"https://{egress.host.address}:{HTTPS_PORT}/from/java"
    trust = [f"-Djavax.net.ssl.trustStore={jks}", "-Djavax.net.ssl.trustStorePassword=changeit"]
    argv = [JAVA, *trust, str(JAVA_CLIENT), url, "jvm body"]
    java = egress.client(argv, stem="java")
    assert java.wait_message("response", timeout=60)["status"] == 201
    java.finish()
    record = _http(egress.sensor, method="POST", path="/from/java")
    assert record["process"]["pid"] == java.pid
    assert _body(record["request"]) == b"jvm body"
    assert _body(record["response"]) == b"echo:jvm body"


@pytest.mark.sensor_outside
def test_flowtap_outside_the_egress_cgroup(egress: Egress) -> None:
    """The getsockopt program does not see the proxy's sockets then: the original
    destination comes from the kernel's table, with the same result."""
    post = egress.curl("-d", "outside", f"https://{NAME}:{HTTPS_PORT}/outside", stem="curl")
    post.finish()
    record = _http(egress.sensor, method="POST", path="/outside")
    assert record["process"]["pid"] == post.pid
    assert _body(record["response"]) == b"echo:outside"
    assert "from the kernel's table instead of SO_ORIGINAL_DST" in egress.sensor.stderr()
    records = egress.sensor.finish()
    assert _egress_close(records)["remote"] == {"ip": egress.host.address, "port": HTTPS_PORT}
    stats = json.loads(egress.sensor.stats_file.read_text())["egress"]
    assert (stats["kernel_redirected"], stats["kernel_answered"]) == (1, 0)


def test_a_slow_client_is_timed_out_while_others_are_served(egress: Egress) -> None:
    """Half a request head, then silence: 408 after --proxy-header-timeout, and a curl
    made meanwhile is served at once."""
    script = f"""
import json, os, socket, time
s = socket.create_connection(({egress.host.address!r}, {HTTP_PORT}), timeout=30)
s.sendall(b"GET /slow HTTP/1.1\\r\\nHost: x\\r\\n")
print(json.dumps({{"event": "sent", "pid": os.getpid()}}), flush=True)
start = time.monotonic()
answer = s.recv(65536)
print(json.dumps({{"event": "answer", "pid": os.getpid(), "status": answer[9:12].decode(),
                  "after": time.monotonic() - start}}), flush=True)
"""
    slow = egress.client([PYTHON, "-c", script], stem="slow")
    slow.wait_message("sent")
    fast = egress.client(
        [CURL, "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
         f"http://{egress.host.address}:{HTTP_PORT}/fast"],
        stem="fast",
    )  # fmt: skip
    fast.finish()
    assert slow.popen.poll() is None  # still waiting for its answer
    answer = slow.wait_message("answer")
    slow.finish()
    assert answer["status"] == "408"
    assert HEADER_TIMEOUT_S - 0.5 <= answer["after"] <= HEADER_TIMEOUT_S + 3
    assert _http(egress.sensor, method="GET", path="/fast")["response"]["status"] == 200
    egress.sensor.finish()
    assert [base64.b64decode(m["raw"]).split(b" ")[1] for m in egress.received()] == [b"/fast"]
    stats = json.loads(egress.sensor.stats_file.read_text())["egress"]
    assert stats["timeouts_header"] == 1


def test_descriptor_exhaustion_does_not_end_the_sensor(egress: Egress) -> None:
    """A forwarded client holds more connections than the sensor has descriptors left
    (its limit lowered while it runs: the proxy's cap was set from the limit at start, so
    accept meets EMFILE); the sensor stopped meanwhile still exits cleanly with its drop
    report and stats file, and says what ran out without a traceback."""
    sensor = egress.sensor
    in_use = len(list(Path(f"/proc/{sensor.pid}/fd").iterdir()))
    limit = in_use + 64
    subprocess.run(["prlimit", "--pid", str(sensor.pid), f"--nofile={limit}:{limit}"],
                   check=True)  # fmt: skip
    script = f"""
import json, os, socket, sys, time
held = []
for _ in range(300):  # bounded: more than the 64 descriptors left, each proxied twice
    held.append(socket.create_connection(({egress.host.address!r}, {HTTP_PORT}), timeout=10))
print(json.dumps({{"event": "holding", "pid": os.getpid(), "count": len(held)}}), flush=True)
time.sleep(float(sys.argv[1]))
"""
    holder = egress.client([PYTHON, "-c", script, str(30 * TIMEOUT_SCALE)], stem="holder")
    assert holder.wait_message("holding")["count"] == 300
    # The proxy runs out of descriptors (it says so); the sensor is stopped while it is.
    sensor.wait_log("the proxy cannot accept connections (")
    stats = sensor.stop()
    holder.kill()
    assert stats["egress"]["accept_errors"] > 0, stats["egress"]
    assert "exit summary" in sensor.stderr()
    assert "Traceback" not in sensor.stderr()
