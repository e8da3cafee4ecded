"""A kernel that refuses the TLS probes: the sensor starts without them and says so.

The refusal is injected (this kernel loads them): the first load of the object fails as a
refused uprobe program would, the second, without the uprobe programs, is the real one.
"""

from __future__ import annotations

import io
import os

import pytest

from flowtap.config import SensorConfig
from flowtap.loader.errors import BpfError
from flowtap.loader.libbpf import BpfObject
from flowtap.sensor import Sensor
from flowtap.sinks.jsonl import JsonLinesSink


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("loads eBPF programs into the kernel, which needs root")


def test_sensor_starts_without_tls_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    real_load = BpfObject.load
    loads: list[list[str]] = []

    def load(obj: BpfObject) -> None:
        # What each attempt asks the kernel to load.
        loads.append(
            [p.name for p in obj.programs() if p.section.startswith(("uprobe", "uretprobe"))]
        )
        if len(loads) == 1:
            raise BpfError("load BPF program: ssl_return (uretprobe): Invalid argument")
        real_load(obj)

    monkeypatch.setattr(BpfObject, "load", load)
    # Scoped to this test process, which the sensor never traces: nothing is captured.
    sensor = Sensor(SensorConfig(pids=(os.getpid(),)), JsonLinesSink(io.StringIO(), owned=True))
    sensor.start()
    try:
        assert sensor.tls is None
        assert sensor.tls_unavailable is not None
        assert "ssl_return" in sensor.tls_unavailable
        assert "go_return" in loads[0] and "ssl_return" in loads[0]
    finally:
        sensor.stop()
    assert len(loads) == 2
