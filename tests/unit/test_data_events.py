"""Data events: a fixed head, then `length` payload bytes (sent at their real size)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowtap.events import Data, DecodeError, EventDecoder
from flowtap.loader.btf import Btf

PackEvent = Callable[[str, dict[str, int | bytes]], bytes]


@pytest.fixture(scope="module")
def sources(btf: Btf) -> dict[str, int]:
    return btf.enum_values("ft_source")


def data_event(
    pack_event: PackEvent,
    decoder: EventDecoder,
    payload: bytes,
    *,
    flow: int,
    source: int,
    length: int | None = None,
) -> bytes:
    head = pack_event(
        "ft_data_event",
        {
            "hdr.timestamp_ns": 77,
            "conn_id": 9,
            "position": 1_000,
            "flow": flow,
            "length": len(payload) if length is None else length,
            "source": source,
        },
    )
    fixed = decoder.layout("ft_data_event").head().size
    return head[:fixed] + payload


def test_openssl_plaintext_event(
    pack_event: PackEvent, decoder: EventDecoder, flows: dict[str, int], sources: dict[str, int]
) -> None:
    raw = data_event(
        pack_event,
        decoder,
        b"GET / HTTP/1.1\r\n",
        flow=flows["FT_FLOW_TX"],
        source=sources["FT_SOURCE_OPENSSL"],
    )

    assert decoder.decode(raw) == Data(77, 9, "tx", 1_000, b"GET / HTTP/1.1\r\n", "openssl")


def test_socket_event_keeps_only_length_bytes(
    pack_event: PackEvent, decoder: EventDecoder, flows: dict[str, int], sources: dict[str, int]
) -> None:
    raw = data_event(
        pack_event,
        decoder,
        b"HTTP/1.1 200 OK\r\nEXTRA",
        flow=flows["FT_FLOW_RX"],
        source=sources["FT_SOURCE_SOCKET"],
        length=17,
    )

    event = decoder.decode(raw)
    assert isinstance(event, Data)
    assert (event.flow, event.source, event.data) == ("rx", "socket", b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("flow", "source", "length", "message"),
    [
        ("FT_FLOW_TX", 99, None, "unknown data source 99"),
        (None, "FT_SOURCE_SOCKET", None, "unknown flow 0"),
        ("FT_FLOW_TX", "FT_SOURCE_SOCKET", 5000, "exceeds"),
    ],
)
def test_bad_data_events_are_refused(
    pack_event: PackEvent,
    decoder: EventDecoder,
    flows: dict[str, int],
    sources: dict[str, int],
    flow: str | None,
    source: str | int,
    length: int | None,
    message: str,
) -> None:
    raw = data_event(
        pack_event,
        decoder,
        b"abc",
        flow=flows[flow] if flow else 0,
        source=sources[source] if isinstance(source, str) else source,
        length=length,
    )

    with pytest.raises(DecodeError, match=message):
        decoder.decode(raw)


def test_head_cut_short_is_refused(
    pack_event: PackEvent, decoder: EventDecoder, flows: dict[str, int], sources: dict[str, int]
) -> None:
    raw = data_event(
        pack_event, decoder, b"", flow=flows["FT_FLOW_TX"], source=sources["FT_SOURCE_SOCKET"]
    )

    for cut in (8, len(raw) - 1):
        with pytest.raises(DecodeError):
            decoder.decode(raw[:cut])
