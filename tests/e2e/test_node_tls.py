"""Node.js keeps OpenSSL on memory BIOs: its SSL calls touch no socket. Until issue 3's
Node part ties them to their connection, they must be counted, never put on a wrong
connection."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .helpers import Lab, find_pairs, start_server

pytestmark = pytest.mark.e2e

NODE = shutil.which("node") or "/usr/bin/node"
CLIENT = """
const https = require('https');
const go = require('fs').existsSync.bind(null, process.argv[2]);
let done = 0;
function get() {
  https.get(process.argv[1], (r) => { r.resume(); r.on('end', () => {
    if (++done < 3) get(); else console.log(JSON.stringify({event: 'done', pid: process.pid}));
  }); });
}
(function wait() { go() ? get() : setTimeout(wait, 10); })();
"""


@pytest.mark.skipif(not Path(NODE).exists(), reason="node is not installed")
def test_node_https_is_counted_not_misattributed(e2e: Lab, pki: dict[str, Path]) -> None:
    _server, port = start_server(e2e, pki)
    sensor = e2e.sensor(extra=["--direction", "egress", "--capture-level", "summary"])
    go = e2e.file("go")
    client = e2e.spawn(
        [NODE, "-e", CLIENT, f"https://127.0.0.1:{port}/items/5", str(go)],
        cgroup=e2e.cgroup,
        stem="node",
        env={"NODE_EXTRA_CA_CERTS": str(pki["ca"])},
    )
    # node carries OpenSSL in its executable: probed at its exec (exported entries); the
    # requests wait until then.
    sensor.wait_log("probes attached to /usr/bin/node")
    go.touch()
    client.wait_message("done")
    client.finish()
    sensor.wait_for(
        lambda r: [c for _o, c in find_pairs(r, pid=client.pid) if c is not None] or None,
        what="node's connections closed",
    )
    stats = sensor.stop()

    assert [r for r in sensor.http_records() if r["process"]["pid"] == client.pid] == []
    assert stats["drops"]["tls_unattributed"] > 0
