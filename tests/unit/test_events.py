"""The event decoder on bytes packed with the real layouts (BTF of conn.bpf.o)."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable

import pytest

from flowtap.egress.strategy import Strategy
from flowtap.events import (
    Conn,
    ConnClose,
    ConnOpen,
    DecodeError,
    Endpoint,
    EventDecoder,
    Exec,
    Exit,
    Flow,
    Fork,
    Task,
)
from flowtap.loader.btf import Btf

Fields = dict[str, int | bytes]
PackEvent = Callable[[str, Fields], bytes]

EVENT_STRUCTS = (
    "ft_conn_open_event",
    "ft_conn_close_event",
    "ft_exec_event",
    "ft_exit_event",
    "ft_fork_event",
)
CONN_STRUCTS = ("ft_conn_open_event", "ft_conn_close_event")

TASK_FIELDS: Fields = {
    "task.pid": 4242,
    "task.tid": 4243,
    "task.uid": 1000,
    "task.comm": b"curl",
}
TASK = Task(pid=4242, tid=4243, uid=1000, comm="curl")


def v4(text: str) -> bytes:
    """An IPv4 address as the kernel stores it: 4 bytes, network order, then zeros."""
    return socket.inet_pton(socket.AF_INET, text) + bytes(12)


def v6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def conn_fields(
    directions: dict[str, int],
    *,
    family: int = socket.AF_INET,
    local: bytes = v4("10.0.0.1"),
    remote: bytes = v4("93.184.216.34"),
    direction: str = "FT_DIR_EGRESS",
) -> Fields:
    return {
        "conn.conn_id": 7,
        "conn.start_ns": 1_000_000,
        "conn.family": family,
        "conn.protocol": socket.IPPROTO_TCP,
        "conn.direction": directions[direction],
        "conn.local_port": 51234,
        "conn.remote_port": 443,
        "conn.local_addr": local,
        "conn.remote_addr": remote,
    }


def valid_records(
    pack_event: PackEvent, directions: dict[str, int], flows: dict[str, int]
) -> dict[str, bytes]:
    """One well-formed record of every kind."""
    conn = conn_fields(directions)
    return {
        "ft_conn_open_event": pack_event(
            "ft_conn_open_event",
            {"hdr.timestamp_ns": 5, **TASK_FIELDS, **conn},
        ),
        "ft_conn_close_event": pack_event(
            "ft_conn_close_event",
            {"hdr.timestamp_ns": 9, **TASK_FIELDS, **conn, "bytes_sent": 10, "established": 1},
        ),
        "ft_exec_event": pack_event(
            "ft_exec_event",
            {**TASK_FIELDS, "filename": b"/bin/true", "args": b"true\0", "args_length": 5},
        ),
        "ft_exit_event": pack_event("ft_exit_event", {"hdr.timestamp_ns": 3, **TASK_FIELDS}),
        "ft_fork_event": pack_event(
            "ft_fork_event", {"hdr.timestamp_ns": 4, **TASK_FIELDS, "parent_pid": 1}
        ),
    }


# --- well-formed records ------------------------------------------------------------


def array_size(decoder: EventDecoder, struct_name: str, field: str) -> int:
    layout = decoder.layout(struct_name)
    value = layout.unpack(bytes(layout.size))[field]
    assert isinstance(value, bytes)
    return len(value)


@pytest.mark.parametrize(
    ("struct_name", "field", "size"),
    [
        ("ft_exit_event", "task.comm", 16),  # FT_COMM_LEN
        ("ft_conn_close_event", "sniff.data", 512),  # FT_SNIFF_LEN
        ("ft_exec_event", "filename", 256),  # FT_PATH_LEN
        ("ft_exec_event", "cgroup_name", 128),  # FT_CGROUP_NAME_LEN
        ("ft_exec_event", "args", 512),  # FT_ARGS_LEN
        ("ft_conn_open_event", "conn.local_addr", 16),
        ("ft_conn_close_event", "conn.remote_addr", 16),
    ],
)
def test_array_sizes_match_flowtap_h(
    decoder: EventDecoder, struct_name: str, field: str, size: int
) -> None:
    """Sizes that bpf/flowtap.h defines, as the BTF of the compiled object reports them."""
    assert array_size(decoder, struct_name, field) == size


def test_open_event_is_header_task_and_conn(decoder: EventDecoder) -> None:
    """The kernel sends an open once the connection is established: nothing else to carry."""
    names = decoder.layout("ft_conn_open_event").names

    assert {name.split(".")[0] for name in names} == {"hdr", "task", "conn"}


def test_counters_match_flowtap_h(btf: Btf) -> None:
    assert btf.enum_values("ft_counter") == {
        "FT_CNT_RINGBUF_FULL": 0,
        "FT_CNT_CONN_TABLE_FULL": 1,
        "FT_CNT_SNIFF_READ_FAILED": 2,
        "FT_CNT_PID_TABLE_FULL": 3,
        "FT_CNT_INGRESS_UNATTRIBUTED": 4,
        "FT_CNT_LISTENER_TABLE_FULL": 5,
        "FT_CNT_PAYLOAD_READ_FAILED": 6,
        "FT_CNT_TLS_UNATTRIBUTED": 7,
        "FT_CNT_TLS_CALLS_FULL": 8,
        "FT_CNT_PAYLOAD_SHED": 9,
        "FT_CNT_GO_CONN_UNRESOLVED": 10,
        "FT_CNT_STRATEGY_TABLE_FULL": 11,
        "FT_CNT_CONN_OPEN_LOST": 12,
        "FT_CNT_CONN_CLOSE_LOST": 13,
        "FT_CNT_CONN_UNREPORTED": 14,
        "FT_CNT_JAVA_UNRESOLVED": 15,
        "FT_CNT_MAX": 16,
    }


def test_strategies_match_flowtap_h(btf: Btf) -> None:
    """The values /proc's scan writes into the strategies table (egress/strategy.py)."""
    assert btf.enum_values("ft_strategy") == {
        f"FT_STRATEGY_{member.name}": member.value for member in Strategy
    }


def test_listener_layout_round_trip(btf: Btf) -> None:
    """ft_listener as the sensor writes it for listeners that predate it."""
    layout = btf.struct_layout("ft_listener")
    data = layout.pack({**TASK_FIELDS, "sk": 0xFFFF888012345678, "traced": 1})

    fields = layout.unpack(data)

    assert len(data) == layout.size == 48
    assert fields.integer("sk") == 0xFFFF888012345678
    assert fields.integer("task.pid") == 4242
    assert fields.integer("task.tid") == 4243
    assert fields.integer("task.uid") == 1000
    assert fields.raw("task.comm").rstrip(b"\0") == b"curl"
    assert fields.integer("traced") == 1


def test_conn_state_fields_read_at_exit(btf: Btf) -> None:
    """What the sensor reads from the conns table when it stops."""
    layout = btf.struct_layout("ft_conn_state")
    values: Fields = {
        "task.pid": 0,
        "owner_pending": 1,
        "closed": 1,
        "established": 1,
        "datagrams_sent": 3,
        "datagrams_received": 2,
    }

    fields = layout.unpack(layout.pack(values))

    for name, value in values.items():
        assert fields.integer(name) == value
    assert fields.as_dict()["owner_pending"] == 1
    assert fields["datagrams_sent"] == 3
    assert layout.names[-3:] == ("sniff.flow", "sniff.length", "sniff.data")  # sniff last


def test_config_has_wakeup_bytes(btf: Btf) -> None:
    layout = btf.struct_layout("ft_config")
    image = layout.pack({"self_tgid": 1, "trace_egress": 1, "wakeup_bytes": 256 << 10})

    assert layout.unpack(image).integer("wakeup_bytes") == 256 << 10
    assert btf.variable_offset(".rodata", "cfg")[1] == len(image)


def test_open_ipv4_egress(
    decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int]
) -> None:
    data = pack_event(
        "ft_conn_open_event",
        {
            "hdr.timestamp_ns": 123_456_789,
            **TASK_FIELDS,
            **conn_fields(directions),
        },
    )

    assert decoder.decode(data) == ConnOpen(
        timestamp_ns=123_456_789,
        task=TASK,
        conn=Conn(
            conn_id=7,
            start_ns=1_000_000,
            family="ipv4",
            protocol="tcp",
            direction="egress",
            local=Endpoint("10.0.0.1", 51234),
            remote=Endpoint("93.184.216.34", 443),
        ),
    )


def test_open_ipv6_ingress(
    decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int]
) -> None:
    fields = conn_fields(
        directions,
        family=socket.AF_INET6,
        local=v6("2001:db8::1"),
        remote=v6("2001:db8:0:0:1:0:0:ff"),
        direction="FT_DIR_INGRESS",
    )
    data = pack_event("ft_conn_open_event", {**TASK_FIELDS, **fields})

    event = decoder.decode(data)

    assert isinstance(event, ConnOpen)
    assert event.conn.family == "ipv6"
    assert event.conn.direction == "ingress"
    assert event.conn.local == Endpoint("2001:db8::1", 51234)
    assert event.conn.remote == Endpoint("2001:db8::1:0:0:ff", 443)


def test_v4_mapped_ipv6_is_shown_as_ipv4(
    decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int]
) -> None:
    fields = conn_fields(
        directions,
        family=socket.AF_INET6,
        local=v6("::ffff:10.1.2.3"),
        remote=v6("::ffff:192.0.2.1"),
    )
    event = decoder.decode(pack_event("ft_conn_open_event", {**TASK_FIELDS, **fields}))

    assert isinstance(event, ConnOpen)
    assert event.conn.family == "ipv4"
    assert event.conn.local.ip == "10.1.2.3"
    assert event.conn.remote.ip == "192.0.2.1"


def test_ipv4_ignores_bytes_after_the_first_four(
    decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int]
) -> None:
    fields = conn_fields(directions, local=v4("10.0.0.1")[:4] + b"\xff" * 12)
    event = decoder.decode(pack_event("ft_conn_open_event", {**TASK_FIELDS, **fields}))

    assert isinstance(event, ConnOpen)
    assert event.conn.local.ip == "10.0.0.1"


def test_close_all_fields(
    decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int]
) -> None:
    data = pack_event(
        "ft_conn_close_event",
        {
            "hdr.timestamp_ns": 2_000_000_000,
            **TASK_FIELDS,
            **conn_fields(directions),
            "bytes_sent": 2**40 + 1,
            "bytes_received": 65_537,
            "sock_error": 111,
            "old_state": 2,
            "established": 0,
            "open_emitted": 1,
            "open_lost": 1,
        },
    )

    assert decoder.decode(data) == ConnClose(
        timestamp_ns=2_000_000_000,
        task=TASK,
        conn=Conn(
            conn_id=7,
            start_ns=1_000_000,
            family="ipv4",
            protocol="tcp",
            direction="egress",
            local=Endpoint("10.0.0.1", 51234),
            remote=Endpoint("93.184.216.34", 443),
        ),
        bytes_sent=2**40 + 1,
        bytes_received=65_537,
        sock_error=111,
        old_state=2,
        established=False,
        open_emitted=True,
        open_lost=True,
    )


def close_with_sniff(
    pack_event: PackEvent, directions: dict[str, int], **sniff: int | bytes
) -> bytes:
    fields = {**TASK_FIELDS, **conn_fields(directions)}
    fields.update({f"sniff.{name}": value for name, value in sniff.items()})
    return pack_event("ft_conn_close_event", fields)


@pytest.mark.parametrize(("flow_name", "flow"), [("FT_FLOW_TX", "tx"), ("FT_FLOW_RX", "rx")])
def test_sniff_data_is_cut_to_length(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    flows: dict[str, int],
    flow_name: str,
    flow: Flow,
) -> None:
    payload = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    data = close_with_sniff(pack_event, directions, flow=flows[flow_name], length=14, data=payload)

    event = decoder.decode(data)

    assert isinstance(event, ConnClose)
    assert (event.sniff_flow, event.sniff) == (flow, b"GET / HTTP/1.1")


def test_no_sniff(decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int]) -> None:
    event = decoder.decode(close_with_sniff(pack_event, directions, flow=0, length=0))

    assert isinstance(event, ConnClose)
    assert (event.sniff_flow, event.sniff) == (None, b"")


@pytest.mark.parametrize("length", [0, 1, 511, 512])
def test_sniff_lengths_up_to_the_buffer(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    flows: dict[str, int],
    length: int,
) -> None:
    payload = bytes(range(256)) * 2
    data = close_with_sniff(
        pack_event, directions, flow=flows["FT_FLOW_RX"], length=length, data=payload
    )

    event = decoder.decode(data)

    assert isinstance(event, ConnClose)
    assert event.sniff == payload[:length]


def test_exec_all_fields(decoder: EventDecoder, pack_event: PackEvent) -> None:
    args = b"curl\0-sS\0\0https://example.com/a b\0"
    data = pack_event(
        "ft_exec_event",
        {
            "hdr.timestamp_ns": 31,
            **TASK_FIELDS,
            "ppid": 4000,
            "cgroup_id": 0x1234_5678_9ABC,
            "filename": b"/usr/bin/curl",
            "cgroup_name": b"session-3.scope",
            "args": args + b"garbage past args_length",
            "args_length": len(args),
        },
    )

    assert decoder.decode(data) == Exec(
        timestamp_ns=31,
        task=TASK,
        ppid=4000,
        cgroup_id=0x1234_5678_9ABC,
        filename="/usr/bin/curl",
        cgroup_name="session-3.scope",
        argv=("curl", "-sS", "", "https://example.com/a b"),
    )


def test_exec_argv_cut_inside_the_last_argument(
    decoder: EventDecoder, pack_event: PackEvent
) -> None:
    """At FT_ARGS_LEN the kernel stops mid-argument and there is no final NUL."""
    args = b"python3\0-c\0" + b"x" * 600
    data = pack_event("ft_exec_event", {**TASK_FIELDS, "args": args[:512], "args_length": 512})

    event = decoder.decode(data)

    assert isinstance(event, Exec)
    assert event.argv == ("python3", "-c", "x" * (512 - len(b"python3\0-c\0")))


def test_exec_without_args(decoder: EventDecoder, pack_event: PackEvent) -> None:
    data = pack_event(
        "ft_exec_event",
        {**TASK_FIELDS, "filename": b"/bin/sh", "args": b"sh\0", "args_length": 0},
    )

    event = decoder.decode(data)

    assert isinstance(event, Exec)
    assert event.argv == ()
    assert event.filename == "/bin/sh"
    assert event.cgroup_name == ""


def test_exit(decoder: EventDecoder, pack_event: PackEvent) -> None:
    data = pack_event("ft_exit_event", {"hdr.timestamp_ns": 8, **TASK_FIELDS})

    assert decoder.decode(data) == Exit(timestamp_ns=8, task=TASK)


def test_comm_of_16_bytes_without_nul(decoder: EventDecoder, pack_event: PackEvent) -> None:
    data = pack_event("ft_exit_event", {**TASK_FIELDS, "task.comm": b"0123456789abcdef"})

    event = decoder.decode(data)

    assert isinstance(event, Exit)
    assert event.task.comm == "0123456789abcdef"


def test_comm_bytes_that_are_not_utf8_are_escaped(
    decoder: EventDecoder, pack_event: PackEvent
) -> None:
    data = pack_event("ft_exit_event", {**TASK_FIELDS, "task.comm": b"a\xffb\0junk"})

    event = decoder.decode(data)

    assert isinstance(event, Exit)
    assert event.task.comm == "a\\xffb"


# --- malformed records: DecodeError, never anything else -----------------------------


def test_empty_record(decoder: EventDecoder) -> None:
    with pytest.raises(DecodeError, match="shorter than its header"):
        decoder.decode(b"")


@pytest.mark.parametrize("size", range(1, 16))
def test_shorter_than_header(decoder: EventDecoder, kinds: dict[str, int], size: int) -> None:
    data = kinds["FT_EVENT_EXIT"].to_bytes(4, "little") + bytes(12)
    with pytest.raises(DecodeError):
        decoder.decode(data[:size])


@pytest.mark.parametrize("kind", [0, 7, 255, 2**31, 2**32 - 1])
def test_unknown_kind(decoder: EventDecoder, kinds: dict[str, int], kind: int) -> None:
    assert kind not in kinds.values()
    with pytest.raises(DecodeError, match=f"unknown event kind {kind}"):
        decoder.decode(kind.to_bytes(4, "little") + bytes(1000))


@pytest.mark.parametrize("struct_name", EVENT_STRUCTS)
def test_every_kind_truncated_by_one_byte(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    flows: dict[str, int],
    struct_name: str,
) -> None:
    data = valid_records(pack_event, directions, flows)[struct_name]
    decoder.decode(data)  # whole: fine

    with pytest.raises(DecodeError, match=struct_name):
        decoder.decode(data[:-1])


@pytest.mark.parametrize("struct_name", EVENT_STRUCTS)
def test_every_kind_header_only(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    flows: dict[str, int],
    struct_name: str,
) -> None:
    data = valid_records(pack_event, directions, flows)[struct_name]
    with pytest.raises(DecodeError):
        decoder.decode(data[:16])


@pytest.mark.parametrize("length", [513, 544, 2**31, 2**32 - 1])
def test_sniff_length_larger_than_buffer(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    flows: dict[str, int],
    length: int,
) -> None:
    data = close_with_sniff(pack_event, directions, flow=flows["FT_FLOW_TX"], length=length)
    with pytest.raises(DecodeError, match="sniff length"):
        decoder.decode(data)


@pytest.mark.parametrize("flow", [3, 2**32 - 1])
def test_sniff_unknown_flow(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    flows: dict[str, int],
    flow: int,
) -> None:
    assert flow not in flows.values()
    data = close_with_sniff(pack_event, directions, flow=flow, length=1)
    with pytest.raises(DecodeError, match="unknown flow"):
        decoder.decode(data)


@pytest.mark.parametrize("struct_name", CONN_STRUCTS)
@pytest.mark.parametrize("family", [0, 1, 3, socket.AF_UNIX, 17, 0xFFFF])
def test_unknown_family(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    struct_name: str,
    family: int,
) -> None:
    data = pack_event(
        struct_name, {**TASK_FIELDS, **conn_fields(directions), "conn.family": family}
    )
    with pytest.raises(DecodeError, match="unknown address family"):
        decoder.decode(data)


@pytest.mark.parametrize("struct_name", CONN_STRUCTS)
@pytest.mark.parametrize("direction", [0, 3, 255])
def test_unknown_direction(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    struct_name: str,
    direction: int,
) -> None:
    assert direction not in directions.values()
    fields = {**TASK_FIELDS, **conn_fields(directions), "conn.direction": direction}
    with pytest.raises(DecodeError, match="unknown direction"):
        decoder.decode(pack_event(struct_name, fields))


def test_fuzz_only_decode_errors(
    decoder: EventDecoder,
    pack_event: PackEvent,
    directions: dict[str, int],
    flows: dict[str, int],
    kinds: dict[str, int],
) -> None:
    """Random bytes and mutated valid records: an event or DecodeError, nothing else."""
    rng = random.Random(0x0F10_7A9)
    seeds = list(valid_records(pack_event, directions, flows).values())
    kind_values = [*kinds.values(), 0, 6]
    decoded = rejected = 0
    for iteration in range(2000):
        choice = iteration % 4
        if choice == 0:  # noise of any length
            data = rng.randbytes(rng.randrange(0, 1100))
        elif choice == 1:  # a plausible kind, then noise
            kind = rng.choice(kind_values)
            data = kind.to_bytes(4, "little") + rng.randbytes(rng.randrange(0, 1100))
        elif choice == 2:  # a valid record with a few bytes changed
            buf = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 8)):
                buf[rng.randrange(4, len(buf))] = rng.randrange(256)
            data = bytes(buf)
        else:  # a valid record cut or extended
            seed = rng.choice(seeds)
            cut = rng.randrange(0, len(seed) + 64)
            data = seed[:cut] + rng.randbytes(max(0, cut - len(seed)))
        try:
            decoder.decode(data)
        except DecodeError:
            rejected += 1
        except Exception as exc:
            pytest.fail(f"iteration {iteration}: {type(exc).__name__}: {exc}; input {data.hex()}")
        else:
            decoded += 1
    # Both outcomes were exercised, so the loop tested something.
    assert decoded > 100
    assert rejected > 100


def test_family_agrees_with_both_addresses(
    decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int]
) -> None:
    fields = conn_fields(
        directions, family=socket.AF_INET6, local=bytes(16), remote=v6("::ffff:192.0.2.1")
    )
    event = decoder.decode(pack_event("ft_conn_close_event", {**TASK_FIELDS, **fields}))

    assert isinstance(event, ConnClose)
    wanted = socket.AF_INET if event.conn.family == "ipv4" else socket.AF_INET6
    for ip in (event.conn.local.ip, event.conn.remote.ip):
        socket.inet_pton(wanted, ip)  # raises OSError when the text is of the other family


def test_udp_dns_flow_is_decoded_as_udp(
    decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int]
) -> None:
    fields = {**TASK_FIELDS, **conn_fields(directions), "conn.protocol": socket.IPPROTO_UDP}
    fields["conn.remote_port"] = 53
    event = decoder.decode(pack_event("ft_conn_open_event", fields))

    assert isinstance(event, ConnOpen)
    assert event.conn.protocol == "udp"
    assert event.conn.remote == Endpoint("93.184.216.34", 53)


@pytest.mark.parametrize("protocol", [0, 1, 132, 255])
def test_unknown_protocol(
    decoder: EventDecoder, pack_event: PackEvent, directions: dict[str, int], protocol: int
) -> None:
    fields = {**TASK_FIELDS, **conn_fields(directions), "conn.protocol": protocol}
    with pytest.raises(DecodeError, match=f"unknown protocol {protocol}"):
        decoder.decode(pack_event("ft_conn_close_event", fields))


def test_fork_event(pack_event: PackEvent, decoder: EventDecoder) -> None:
    raw = pack_event(
        "ft_fork_event",
        {"hdr.timestamp_ns": 5, **TASK_FIELDS, "parent_pid": 4000},
    )

    assert decoder.decode(raw) == Fork(5, TASK, 4000)
