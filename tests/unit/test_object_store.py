"""The object store's queue and exit: every object is uploaded, failed or dropped, once."""

from __future__ import annotations

import os
import socket

from flowtap.sinks.objects import ObjectStore, S3Settings

SCALE = float(os.environ.get("FLOWTAP_TEST_TIMEOUT_SCALE", "1"))


def test_an_endpoint_that_never_answers_costs_the_queued_objects_counted_at_exit() -> None:
    # A loopback listener that takes connections and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(10 * SCALE)
        port = silent.getsockname()[1]
        settings = S3Settings(f"127.0.0.1:{port}", "bucket", insecure=True)
        env = {"FLOWTAP_S3_ACCESS_KEY": "a", "FLOWTAP_S3_SECRET_KEY": "s"}
        store = ObjectStore(settings, capacity=2, environ=env)
        first = store.put(b"0" * 10)
        peer, _addr = silent.accept()  # the first upload is under way, and stuck
        with peer:
            queued = [store.put(b"1" * 10), store.put(b"2" * 10)]
            assert store.put(b"3" * 10) is None  # the queue is full: keep the bytes inline
            assert store.put(b"0" * 10) == first  # the same bytes: referenced again
            assert None not in queued
            store.close(timeout_s=0.5)
        stats = store.stats
        assert (stats.uploaded, stats.errors, stats.deduplicated) == (0, 0, 1)
        assert stats.dropped == 4  # the queue-full one at put(), three at exit
