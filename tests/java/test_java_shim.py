"""The built Java agent jar and JNI shim (make java): what the sensor and the attach rely on.

Cheap: no JVM. The end-to-end checks are tests/e2e/test_java_*.py and tests/java/README.md.
"""

from __future__ import annotations

import ctypes
import platform
import zipfile

import pytest

from flowtap.java import AGENT_JAR, SHIM, SHIM_SIGNATURE, SHIM_SYMBOL

pytestmark = pytest.mark.skipif(
    not (AGENT_JAR.is_file() and SHIM.is_file()), reason="agent not built (make java)"
)


def test_shim_carries_signature_and_symbols() -> None:
    assert SHIM_SIGNATURE in SHIM.read_bytes()
    lib = ctypes.CDLL(str(SHIM))
    for name in (SHIM_SYMBOL, "flowtap_java_active", "Java_flowtap_agent_Native_data"):
        assert hasattr(lib, name), name
    # No probe on it in this process: the agent's hooks stay idle.
    assert lib.flowtap_java_active() == 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 entry instruction")
def test_probed_instruction_is_one_the_kernel_emulates() -> None:
    lib = ctypes.CDLL(str(SHIM))
    address = ctypes.cast(getattr(lib, SHIM_SYMBOL), ctypes.c_void_p).value
    assert address is not None
    # jmp rel8 to the next instruction: a uprobe on it is emulated, not single-stepped.
    assert ctypes.string_at(address, 3) == b"\xeb\x00\xc3"


def test_agent_manifest() -> None:
    with zipfile.ZipFile(AGENT_JAR) as jar:
        manifest = jar.read("META-INF/MANIFEST.MF").decode()
        names = set(jar.namelist())
    for line in (
        "Agent-Class: flowtap.agent.Agent",
        "Premain-Class: flowtap.agent.Agent",
        "Can-Redefine-Classes: true",
        "Can-Retransform-Classes: true",
    ):
        assert line in manifest
    assert "flowtap/agent/Hooks.class" in names
    assert "flowtap/agent/Native.class" in names
