"""The TLS library plug-ins: the registry drives classification, and --tls-probes
switches plug-ins off (tls/plugins)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from runtimes import build_go_peer

from flowtap.cli import build_parser, config_from_args
from flowtap.config import ConfigError, SensorConfig
from flowtap.discovery.cache import ClassCache, Identity
from flowtap.java import SHIM, SHIM_SIGNATURE, SHIM_SYMBOL
from flowtap.loader.btf import Btf
from flowtap.tls import plugins
from flowtap.tls.attach import TlsProbes, inspect_file
from flowtap.tls.elf import ElfImage
from flowtap.tls.golang import GoPlacement
from flowtap.tls.placement import Placement, ProbeSite
from flowtap.tls.plugins.javatls import ShimPlacement
from flowtap.tracking import payloads

LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
NODE = Path("/usr/bin/node")


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Go HTTPS peer built with whichever toolchain is here (cached under build/)."""
    for minor in ("1.21", "1.19", "1.25", "1.27"):
        peer = build_go_peer(minor, "stripped")
        if peer is not None:
            copy = tmp_path_factory.mktemp("go") / "tlspeer"
            shutil.copy(peer.path, copy)
            return copy
    pytest.skip("no Go toolchain (make runtimes, or Debian's golang-go)")


def test_registry_order_names_and_sources() -> None:
    # Tried in this order: Go, then node, then plain OpenSSL, then flowtap's Java shim.
    assert plugins.NAMES == ("gotls", "nodetls", "openssl", "javassl")
    assert plugins.sources() == {
        "FT_SOURCE_GOTLS": "gotls",
        "FT_SOURCE_OPENSSL": "openssl",
        "FT_SOURCE_JAVA": "java",
    }
    assert plugins.select(("openssl", "gotls")) == (plugins.LIBRARIES[0], plugins.LIBRARIES[2])
    with pytest.raises(KeyError, match="rustls"):
        plugins.select(("rustls",))
    # Signatures: each once, from the plug-ins asked for only.
    assert plugins.signatures(plugins.LIBRARIES) == (
        b"\xff Go buildinf:",
        b"SSL_write\0",
        b"SSL_read\0",
        SHIM_SIGNATURE,
    )
    assert plugins.signatures(plugins.select(("gotls",))) == (b"\xff Go buildinf:",)
    # Records carry the plug-ins' capture sources.
    assert payloads._CAPTURE_SOURCES == {
        "socket": "plaintext",
        "gotls": "gotls",
        "openssl": "openssl",
        "java": "java",
    }


def test_every_plugin_source_is_in_the_bpf_enum(btf: Btf) -> None:
    enum = btf.enum_values("ft_source")
    for library in plugins.LIBRARIES:
        assert library.source_enum in enum, library.name


@pytest.mark.skipif(not LIBSSL.exists(), reason="needs Debian's libssl.so.3")
def test_libssl_is_classified_by_the_openssl_plugin(tmp_path: Path) -> None:
    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    found = inspect_file(copy, "libssl")
    assert found is not None
    assert found.library.name == "openssl"
    assert isinstance(found.plan, Placement)
    assert found.plan.runtime == ""
    assert found.sites() == found.plan.sites()
    # Switched off: nothing to probe; the others do not take it (the Java shim's plug-in
    # neither: libssl carries none of its signature).
    others = plugins.select(("gotls", "nodetls", "javassl"))
    assert inspect_file(copy, "libssl", libraries=others) is None


@pytest.mark.skipif(not SHIM.exists(), reason="the Java shim is not built (make java)")
def test_the_java_shim_is_classified_by_the_javassl_plugin(tmp_path: Path) -> None:
    """Whatever its path (a copy staged in a JVM's /tmp): one entry probe, at the file
    offset of flowtap_java_data."""
    copy = tmp_path / "staged.so"
    shutil.copy(SHIM, copy)
    found = inspect_file(copy, "staged")
    assert found is not None
    assert found.library.name == "javassl"
    assert found.library.source == "java"
    with ElfImage(copy) as image:
        symbol = image.functions({SHIM_SYMBOL})[SHIM_SYMBOL]
        offset = image.file_offset(symbol.address)
    assert found.plan == ShimPlacement(offset)
    assert found.sites() == [ProbeSite("java_data_enter", offset)]
    # Switched off, nothing takes it.
    assert inspect_file(copy, "staged", libraries=plugins.select(("openssl",))) is None


def test_go_executable_is_classified_by_the_gotls_plugin(go_client: Path) -> None:
    found = inspect_file(go_client, "go")
    assert found is not None
    assert found.library.name == "gotls"
    assert found.kind == "go"
    assert isinstance(found.plan, GoPlacement)
    assert inspect_file(go_client, "go", libraries=plugins.select(("openssl", "nodetls"))) is None


@pytest.mark.skipif(not NODE.exists(), reason="needs /usr/bin/node")
def test_node_is_classified_by_the_nodetls_plugin() -> None:
    found = inspect_file(NODE, "node")
    assert found is not None
    assert found.library.name == "nodetls"
    assert found.library.source == "openssl"  # node's records are OpenSSL's
    assert isinstance(found.plan, Placement)
    assert found.plan.runtime.startswith("node v")
    # nodetls off: node is left alone, not probed as plain OpenSSL.
    assert inspect_file(NODE, "node", libraries=plugins.select(("openssl", "gotls"))) is None


class _FakeMap:
    def __init__(self, log: list[str], name: str) -> None:
        self._log, self._name = log, name

    def update(self, key: bytes, value: bytes) -> None:
        self._log.append(f"update {self._name}")


class _FakeProgram:
    def __init__(self, log: list[str], name: str) -> None:
        self._log, self._name = log, name

    def attach_uprobe(
        self, binary: str, offset: int, *, pid: int = -1, retprobe: bool = False
    ) -> None:
        self._log.append(f"attach {self._name}")


class _FakeObject:
    def __init__(self) -> None:
        self.log: list[str] = []

    def program(self, name: str) -> _FakeProgram:
        return _FakeProgram(self.log, name)

    def map(self, name: str) -> _FakeMap:
        return _FakeMap(self.log, name)


@pytest.mark.skipif(not LIBSSL.exists(), reason="needs Debian's libssl.so.3")
def test_switched_off_plugin_is_not_attached_nor_cached_as_nothing(
    tmp_path: Path, go_client: Path, btf: Btf, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, library)
    cache = ClassCache(tmp_path / "state")
    fake = _FakeObject()
    probes = TlsProbes(
        fake,  # type: ignore[arg-type]
        "file",
        cache=cache,
        libraries=plugins.select(("gotls",)),
    )
    monkeypatch.setattr(probes, "btf", lambda: btf)
    assert probes.probe_file(str(library), "libssl") is None
    assert not any(line.startswith("attach ssl") for line in fake.log)
    # Not "nothing" for good: a run with openssl on must read it again.
    assert cache.lookup(Identity.of(library.stat())) is None
    # The Go executable is probed, and its after-attach step ran (go_probed).
    plan = probes.probe_file(str(go_client), "go")
    assert plan is not None and plan.library.name == "gotls"
    assert any(line.startswith("attach go_") for line in fake.log)
    assert "update go_probed" in fake.log
    assert "update go_executables" in fake.log  # a non-PIE build: its tls.Conn walk


def test_tls_probes_setting() -> None:
    parser = build_parser()
    default = config_from_args(parser.parse_args(["run"]))
    assert default.tls_probes == plugins.NAMES
    chosen = config_from_args(parser.parse_args(["run", "--tls-probes", "gotls, openssl"]))
    assert chosen.tls_probes == ("gotls", "openssl")
    with pytest.raises(
        ConfigError, match=r"--tls-probes rustls: .*gotls, nodetls, openssl, javassl"
    ):
        SensorConfig(tls_probes=("openssl", "rustls")).validate()
    with pytest.raises(ConfigError, match="--tls-probes"):
        SensorConfig(tls_probes=()).validate()


def test_tls_probes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPOINT_TLS_PROBES", "nodetls")
    args = build_parser().parse_args(["run"])
    assert config_from_args(args).tls_probes == ("nodetls",)
