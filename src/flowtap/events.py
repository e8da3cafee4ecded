"""Kernel events: raw ring-buffer records decoded into typed values.

The layouts come from the BPF object's BTF (loader/btf.py), so this module only names
fields; their offsets and sizes live in bpf/flowtap.h alone.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from flowtap.loader.btf import Btf, Fields, StructLayout
from flowtap.tls import plugins

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

Direction = Literal["egress", "ingress"]
Flow = Literal["tx", "rx"]
# Where data bytes were seen: "socket", or the capture source of a TLS plug-in
# ("openssl", "gotls": tls/plugins).
Source = str
SOCKET_SOURCE: Source = "socket"
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class DecodeError(ValueError):
    """A ring-buffer record that does not match any known layout."""


@dataclass(frozen=True, slots=True)
class Task:
    pid: int
    tid: int
    uid: int
    comm: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int


Protocol = Literal["tcp", "udp"]
_PROTOCOLS: dict[int, Protocol] = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}


@dataclass(frozen=True, slots=True)
class Conn:
    conn_id: int
    start_ns: int
    family: Literal["ipv4", "ipv6"]
    protocol: Protocol
    direction: Direction
    local: Endpoint
    remote: Endpoint


@dataclass(frozen=True, slots=True)
class ConnOpen:
    timestamp_ns: int
    task: Task
    conn: Conn


@dataclass(frozen=True, slots=True)
class ConnClose:
    timestamp_ns: int
    task: Task
    conn: Conn
    bytes_sent: int
    bytes_received: int
    sock_error: int
    old_state: int
    established: bool
    open_emitted: bool
    # Its open event was lost (ring buffer full): the open record is made from this one.
    open_lost: bool = False
    # The first bytes the connection moved through a user buffer, and which way; b"" if none.
    sniff_flow: Flow | None = None
    sniff: bytes = b""


@dataclass(frozen=True, slots=True)
class Data:
    """Payload bytes of one connection in one direction, from position on."""

    timestamp_ns: int
    conn_id: int
    flow: Flow
    position: int
    data: bytes
    source: Source = SOCKET_SOURCE
    # Bytes at position not copied because userspace asked so (data is then empty).
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Exec:
    timestamp_ns: int
    task: Task
    ppid: int
    cgroup_id: int
    filename: str
    cgroup_name: str
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Exit:
    timestamp_ns: int
    task: Task


@dataclass(frozen=True, slots=True)
class Fork:
    timestamp_ns: int
    task: Task  # the new process
    parent_pid: int


Event = ConnOpen | ConnClose | Exec | Exit | Data | Fork


@dataclass(frozen=True, slots=True)
class TrackedConnection:
    close: ConnClose  # what its close event would carry now
    ended: bool  # TCP reached CLOSE; the program has not read everything yet
    dropped: bool  # not to be reported (see unattributed)
    unattributed: bool  # accepted, never used, the listener's owner unknown


def c_string(raw: bytes) -> str:
    """A NUL-terminated C char array as text (undecodable bytes escaped, never an error)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def format_ips(
    family: int, local: bytes, remote: bytes
) -> tuple[Literal["ipv4", "ipv6"], str, str]:
    """Both addresses as text. An IPv6 socket whose addresses are IPv4-mapped (or not yet
    bound, ::) carries IPv4 traffic, so it is shown as IPv4 and :: as 0.0.0.0."""
    if family == AF_INET:
        return "ipv4", socket.inet_ntop(AF_INET, local[:4]), socket.inet_ntop(AF_INET, remote[:4])
    if family != AF_INET6:
        raise DecodeError(f"unknown address family {family}")
    local, remote = local[:16], remote[:16]
    mapped = [a[:12] == _V4_MAPPED_PREFIX for a in (local, remote)]
    unspecified = [a == bytes(16) for a in (local, remote)]
    if any(mapped) and all(m or u for m, u in zip(mapped, unspecified, strict=True)):
        return "ipv4", socket.inet_ntop(AF_INET, local[12:]), socket.inet_ntop(AF_INET, remote[12:])
    return "ipv6", socket.inet_ntop(AF_INET6, local), socket.inet_ntop(AF_INET6, remote)


class EventDecoder:
    """Turns ring-buffer bytes into events, using layouts read from BTF once."""

    def __init__(self, btf: Btf) -> None:
        kinds = btf.enum_values("ft_event_kind")
        directions = btf.enum_values("ft_direction")
        flows = btf.enum_values("ft_flow")
        self._header = btf.struct_layout("ft_header")
        self._direction: dict[int, Direction] = {
            directions["FT_DIR_EGRESS"]: "egress",
            directions["FT_DIR_INGRESS"]: "ingress",
        }
        self._flow: dict[int, Flow] = {flows["FT_FLOW_TX"]: "tx", flows["FT_FLOW_RX"]: "rx"}
        sources = btf.enum_values("ft_source")
        self._source: dict[int, Source] = {sources["FT_SOURCE_SOCKET"]: SOCKET_SOURCE} | {
            sources[enum]: source for enum, source in plugins.sources().items()
        }
        self._layouts: dict[int, StructLayout] = {
            kinds["FT_EVENT_CONN_OPEN"]: btf.struct_layout("ft_conn_open_event"),
            kinds["FT_EVENT_CONN_CLOSE"]: btf.struct_layout("ft_conn_close_event"),
            kinds["FT_EVENT_EXEC"]: btf.struct_layout("ft_exec_event"),
            kinds["FT_EVENT_EXIT"]: btf.struct_layout("ft_exit_event"),
            kinds["FT_EVENT_FORK"]: btf.struct_layout("ft_fork_event"),
            kinds["FT_EVENT_DATA"]: btf.struct_layout("ft_data_event"),
        }
        self._decoders: dict[int, Callable[[Fields], Event]] = {
            kinds["FT_EVENT_CONN_OPEN"]: self._open,
            kinds["FT_EVENT_CONN_CLOSE"]: self._close,
            kinds["FT_EVENT_EXEC"]: self._exec,
            kinds["FT_EVENT_EXIT"]: self._exit,
            kinds["FT_EVENT_FORK"]: self._fork,
        }
        self.state_layout = btf.struct_layout("ft_conn_state")
        # Data events are sent at their real length: a fixed part, then `length` bytes.
        self._data_kind = kinds["FT_EVENT_DATA"]
        self._data_head = self._layouts[self._data_kind].head()
        names = ("hdr.timestamp_ns", "conn_id", "position", "flow", "length", "source", "skipped")
        self._data_fields = tuple(self._data_head.int_fields[name] for name in names)

    def layout(self, kind_name: str) -> StructLayout:
        """The layout of one event kind, for tests that build records from bytes."""
        for layout in self._layouts.values():
            if layout.name == kind_name:
                return layout
        raise KeyError(kind_name)

    def decode(self, data: bytes) -> Event:
        if len(data) < self._header.size:
            raise DecodeError(f"record of {len(data)} bytes is shorter than its header")
        kind = int.from_bytes(data[:4], "little")
        layout = self._layouts.get(kind)
        if layout is None:
            raise DecodeError(f"unknown event kind {kind}")
        if kind == self._data_kind:
            return self._data(data)
        if len(data) < layout.size:
            raise DecodeError(f"{layout.name}: {len(data)} bytes, need {layout.size}")
        fields = layout.unpack(data)
        return self._decoders[kind](fields)

    @staticmethod
    def task(fields: Fields, prefix: str = "task.") -> Task:
        return Task(
            pid=fields.integer(prefix + "pid"),
            tid=fields.integer(prefix + "tid"),
            uid=fields.integer(prefix + "uid"),
            comm=c_string(fields.raw(prefix + "comm")),
        )

    def conn(self, fields: Fields, prefix: str = "conn.") -> Conn:
        family, local_ip, remote_ip = format_ips(
            fields.integer(prefix + "family"),
            fields.raw(prefix + "local_addr"),
            fields.raw(prefix + "remote_addr"),
        )
        direction = self._direction.get(fields.integer(prefix + "direction"))
        if direction is None:
            raise DecodeError(f"unknown direction {fields[prefix + 'direction']!r}")
        protocol = _PROTOCOLS.get(fields.integer(prefix + "protocol"))
        if protocol is None:
            raise DecodeError(f"unknown protocol {fields[prefix + 'protocol']!r}")
        return Conn(
            conn_id=fields.integer(prefix + "conn_id"),
            start_ns=fields.integer(prefix + "start_ns"),
            family=family,
            protocol=protocol,
            direction=direction,
            local=Endpoint(local_ip, fields.integer(prefix + "local_port")),
            remote=Endpoint(remote_ip, fields.integer(prefix + "remote_port")),
        )

    def _open(self, f: Fields) -> ConnOpen:
        return ConnOpen(
            timestamp_ns=f.integer("hdr.timestamp_ns"),
            task=self.task(f),
            conn=self.conn(f),
        )

    def _close(self, f: Fields) -> ConnClose:
        return self._close_from(f, f.integer("hdr.timestamp_ns"), f.integer("old_state"))

    def _close_from(self, f: Fields, timestamp_ns: int, old_state: int) -> ConnClose:
        """A close from the fields a close event and a connection's state share."""
        flow, data = self.sniff(f)
        return ConnClose(
            timestamp_ns=timestamp_ns,
            task=self.task(f),
            conn=self.conn(f),
            bytes_sent=f.integer("bytes_sent"),
            bytes_received=f.integer("bytes_received"),
            sock_error=f.integer("sock_error"),
            old_state=old_state,
            established=bool(f.integer("established")),
            open_emitted=bool(f.integer("open_emitted")),
            open_lost=bool(f.integer("open_lost")),
            sniff_flow=flow,
            sniff=data,
        )

    def tracked(self, raw_state: bytes, now_ns: int) -> TrackedConnection:
        """A connection the kernel still tracks (a conns map value), as its close now."""
        f = self.state_layout.unpack(raw_state)
        ended = bool(f.integer("closed"))
        when = f.integer("close_ns") if ended else now_ns
        return TrackedConnection(
            close=self._close_from(f, when, f.integer("close_old_state")),
            ended=ended,
            # Accepted, never used, and its listener's owner filtered out or unknown.
            dropped=bool(f.integer("owner_pending")) and not f.integer("listener_traced"),
            unattributed=bool(f.integer("owner_pending")) and not f.integer("task.pid"),
        )

    def sniff(self, f: Fields) -> tuple[Flow | None, bytes]:
        """The first bytes carried by a close event or a connection's state."""
        data = f.raw("sniff.data")
        length = f.integer("sniff.length")
        if length > len(data):
            raise DecodeError(f"sniff length {length} exceeds buffer of {len(data)}")
        flow_value = f.integer("sniff.flow")
        if flow_value == 0:
            return None, b""
        flow = self._flow.get(flow_value)
        if flow is None:
            raise DecodeError(f"unknown flow {flow_value!r}")
        return flow, data[:length]

    def _exec(self, f: Fields) -> Exec:
        args_buffer = f.raw("args")
        args_length = f.integer("args_length")
        if args_length > len(args_buffer):
            raise DecodeError(f"args length {args_length} exceeds buffer of {len(args_buffer)}")
        args = args_buffer[:args_length]
        argv = tuple(a.decode("utf-8", "backslashreplace") for a in args.rstrip(b"\0").split(b"\0"))
        return Exec(
            timestamp_ns=f.integer("hdr.timestamp_ns"),
            task=self.task(f),
            ppid=f.integer("ppid"),
            cgroup_id=f.integer("cgroup_id"),
            filename=c_string(f.raw("filename")),
            cgroup_name=c_string(f.raw("cgroup_name")),
            argv=argv if args else (),
        )

    def _data(self, data: bytes) -> Data:
        fixed = self._data_head.size
        if len(data) < fixed:
            raise DecodeError(f"data event of {len(data)} bytes is shorter than its header")
        # The busiest record: one unpack and fixed indexes, no per-field lookups.
        values = self._data_head.codec.unpack_from(data)
        timestamp, conn_id, position, flow_value, length, source_value, skipped = (
            values[i] for i in self._data_fields
        )
        if length > len(data) - fixed:
            raise DecodeError(f"data length {length} exceeds the {len(data)} bytes received")
        flow = self._flow.get(flow_value)
        if flow is None:
            raise DecodeError(f"unknown flow {flow_value!r}")
        source = self._source.get(source_value)
        if source is None:
            raise DecodeError(f"unknown data source {source_value!r}")
        return Data(
            timestamp, conn_id, flow, position, data[fixed : fixed + length], source, skipped
        )

    def _exit(self, f: Fields) -> Exit:
        return Exit(f.integer("hdr.timestamp_ns"), self.task(f))

    def _fork(self, f: Fields) -> Fork:
        return Fork(f.integer("hdr.timestamp_ns"), self.task(f), f.integer("parent_pid"))
