"""The hooks each capability gets, as the sensor reports them, with fallbacks forced.

`--avoid-kernel-features` takes away on this kernel what older ones lack (docs/hooks.md),
so the bounded build, the per-thread hash and the kernel-stack registers run here for
real; `make test-fallbacks` runs the whole kernel-matrix selection that way, and the
guests of `make test-kernels` get them because their kernels lack the features.
"""

from __future__ import annotations

import pytest

from .helpers import Lab
from .test_transfer import check_exchange

pytestmark = pytest.mark.e2e

WHAT_5_10_LACKS = "loop,atomics,for-each,task-storage,task-btf,task-pt-regs,socket-cookie"


@pytest.mark.kernels
def test_the_plan_is_in_the_stats_file(e2e: Lab) -> None:
    """Whatever the kernel, the stats file says which hook each capability got."""
    server = e2e.server(read=10, reply=20)
    sensor = e2e.sensor()
    client = e2e.client(server, send=10, expect=20)
    client.finish()
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    sensor.finish()
    kernel = sensor.stats["kernel"] if sensor.stats else {}
    for capability in ("connections", "byte counts", "plaintext payloads", "OpenSSL", "Go"):
        assert kernel[capability]["hook"], kernel
    assert kernel["release"]


def test_forced_fallbacks_keep_exact_bytes(e2e: Lab) -> None:
    """What a 5.10 kernel gets, forced on this one: the same records, exact byte counts."""
    server = e2e.server(host="::1", read=70_001, reply=3 << 20)
    sensor = e2e.sensor(extra=["--avoid-kernel-features", WHAT_5_10_LACKS])
    client = e2e.client(server, send=70_001, expect=3 << 20, how="sendmsg")
    client.finish()
    sensor.wait_for_closed(pid=client.pid, direction="egress")
    sensor.wait_for_closed(pid=server.pid, direction="ingress")
    records = sensor.finish()
    check_exchange(records, server, client, sent=70_001, received=3 << 20, family="ipv6", ip="::1")
    kernel = sensor.stats["kernel"] if sensor.stats else {}
    assert kernel["avoided"] == sorted(WHAT_5_10_LACKS.split(","))
    assert kernel["connections"]["detail"].startswith("bounded build (loop: avoided")
    assert "the task's kernel stack" in kernel["plaintext payloads"]["hook"]
    assert "hash by thread id" in kernel["OpenSSL"]["detail"]
    # The bounded build's connection ids are the clock and the CPU, not a counter.
    assert all(r["connection_id"] > 1 << 20 for r in records)


def test_unknown_feature_is_refused(e2e: Lab) -> None:
    sensor = e2e.sensor(extra=["--avoid-kernel-features", "loop,warp"], wait=False)
    assert sensor.popen.wait(timeout=20) == 2
    assert "--avoid-kernel-features warp: not a kernel feature" in sensor.stderr()
