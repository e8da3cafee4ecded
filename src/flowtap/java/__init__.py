"""The Java agent and its native shim (built by `make java` from java/).

The agent, loaded into a JVM, hands each piece of TLS plaintext to the shim's
`flowtap_java_data(int fd, int flow, const void *buf, long len)` (flow 1 = sent, 2 = received),
which the sensor uprobes.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

AGENT_JAR: Path = _HERE / "flowtap-agent.jar"
SHIM: Path = _HERE / "libflowtap-java.so"
# In the shim's .rodata: how the sensor recognises the file (e.g. mapped from another path).
SHIM_SIGNATURE: bytes = b"flowtap-java-shim 1"
SHIM_SYMBOL = "flowtap_java_data"
# flowtap_java_data's `flow` argument.
FLOW_TX = 1
FLOW_RX = 2
