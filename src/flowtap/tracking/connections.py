"""Connection table: kernel open/close events in, connection records out.

Events may arrive out of order (an open and a close from different CPUs) or not at all
(ring buffer full, counted in the kernel): a close always produces a complete pair of
records, synthesizing the open when it was never seen.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from flowtap.events import Conn, ConnClose, ConnOpen, Task
from flowtap.protocols.sniff import describe_sni, guess_l7
from flowtap.records.connection import (
    Record,
    WallClock,
    close_status,
    close_value,
    errno_name,
    open_value,
    process_value,
)
from flowtap.records.model import ConnectionRecord, to_dict
from flowtap.tracking.processes import ProcessInfo, ProcessRegistry

log = logging.getLogger("flowtap.connections")

_MAX_OPEN = 65536
_RECENTLY_CLOSED = 4096


@dataclass(slots=True)
class _Entry:
    opened: ConnectionRecord | None
    visible: bool
    conn: Conn


@dataclass(slots=True)
class TrackerStats:
    opened: int = 0
    closed: int = 0
    opens_synthesized: int = 0
    opens_lost: int = 0  # of those, the kernel's open event was lost (not a failed handshake)
    late_events: int = 0
    evicted: int = 0
    filtered: int = 0
    lost: int = 0
    redirected: int = 0  # to the egress proxy: its own records describe them


class ConnectionTracker:
    """emit gets each record serialized (records/model.py: to_dict), once."""

    def __init__(
        self,
        registry: ProcessRegistry,
        emit: Callable[[Record], None],
        *,
        accept_process: Callable[[ProcessInfo], bool] = lambda _info: True,
        clock: WallClock | None = None,
        on_ended: Callable[[ConnClose], None] = lambda _event: None,
    ) -> None:
        self._registry = registry
        self._emit = emit
        self._accept = accept_process
        self._clock = clock or WallClock()
        self._on_ended = on_ended
        self._open: OrderedDict[int, _Entry] = OrderedDict()
        self._closed_order: deque[int] = deque()
        self._closed: set[int] = set()
        # Evicted from a full table after their open record was emitted; bounded like it.
        self._evicted: set[int] = set()
        # The egress proxy's listeners: a redirected connection to one of them is reported
        # by the proxy, with its real destination, not as a loopback connection.
        self.hidden_remotes: frozenset[tuple[str, int]] = frozenset()
        self.stats = TrackerStats()

    @property
    def open_count(self) -> int:
        return len(self._open)

    def on_open(self, event: ConnOpen) -> None:
        conn_id = event.conn.conn_id
        if conn_id in self._closed or conn_id in self._open:
            self.stats.late_events += 1
            return
        entry = self._start(event.task, event.conn, event)
        if entry.visible and entry.opened is not None:
            self._emit_value(entry.opened)

    def on_close(self, event: ConnClose, *, status: str | None = None) -> None:
        """Emits the close record; status overrides the one derived from the socket."""
        conn = event.conn
        entry = self._open.pop(conn.conn_id, None)
        if entry is None:
            if conn.conn_id in self._closed:
                self.stats.late_events += 1
                return
            entry = self._start(event.task, conn, event, register=False, at_exit=bool(status))
            if conn.conn_id in self._evicted:
                self._evicted.discard(conn.conn_id)  # its open record went out already
            else:
                # Never saw the open: the handshake failed, or its event was lost.
                self.stats.opens_synthesized += 1
                self.stats.opens_lost += event.open_lost
                if entry.visible and entry.opened is not None:
                    self._emit_value(entry.opened)
        self._remember_closed(conn.conn_id)
        self.stats.closed += 1
        if not entry.visible or entry.opened is None:
            return
        self._on_ended(event)  # its transactions come first
        error = errno_name(event.sock_error)
        first_tx = event.sniff if event.sniff_flow == "tx" else None
        first_rx = event.sniff if event.sniff_flow == "rx" else None
        self._emit_value(
            close_value(
                entry.opened,
                conn,
                self._clock.rfc3339(event.timestamp_ns),
                bytes_sent=event.bytes_sent,
                bytes_received=event.bytes_received,
                duration_ns=max(event.timestamp_ns - conn.start_ns, 0),
                status=status or close_status(event.sock_error, event.established),
                error=error,
                l7_protocol=guess_l7(
                    first_tx, first_rx, remote_port=conn.remote.port, local_port=conn.local.port
                ),
                sni=describe_sni(first_tx, first_rx),
            )
        )

    def _emit_value(self, record: ConnectionRecord) -> None:
        self._emit(to_dict(record))

    def visible_connection(self, conn_id: int) -> tuple[ConnectionRecord, Conn] | None:
        """The open record and identity of a connection being reported, if it is."""
        entry = self._open.get(conn_id)
        if entry is None or not entry.visible or entry.opened is None:
            return None
        return entry.opened, entry.conn

    def close_remaining(self, remaining: list[ConnClose]) -> None:
        """Closes connections still open when the sensor stops (status open_at_exit)."""
        for event in remaining:
            self.on_close(event, status="open_at_exit")

    def close_lost(self, now_ns: int) -> int:
        """At exit, after close_remaining: connections whose close event was dropped get a
        close record (status lost) so that no open record stays without one."""
        lost = 0
        while self._open:
            conn_id, entry = self._open.popitem(last=False)
            self._remember_closed(conn_id)
            lost += 1
            if not entry.visible or entry.opened is None:
                continue
            self._emit_value(
                close_value(
                    entry.opened,
                    entry.conn,
                    self._clock.rfc3339(now_ns),
                    bytes_sent=0,
                    bytes_received=0,
                    duration_ns=0,
                    status="lost",
                    error=None,
                    l7_protocol=None,
                    sni=None,
                )
            )
        self.stats.lost += lost
        return lost

    def _start(
        self,
        task: Task,
        conn: Conn,
        event: ConnOpen | ConnClose,
        *,
        register: bool = True,
        at_exit: bool = False,
    ) -> _Entry:
        info = self._registry.lookup(task)
        visible = self._accept(info)
        if not visible:
            self.stats.filtered += 1
        elif (conn.remote.ip, conn.remote.port) in self.hidden_remotes:
            visible = False
            self.stats.redirected += 1
        # The kernel sends an open event once a connection is established; one built from
        # a close event never got there (or its open event was lost).
        if isinstance(event, ConnOpen) or event.established:
            state, error = "established", None
        elif at_exit:
            state, error = "connecting", None
        else:
            state, error = "failed", errno_name(event.sock_error)
        opened = open_value(
            conn,
            process_value(info, task.tid),
            # When the kernel registered it (SYN_SENT, or the end of the handshake for
            # ingress), so open <= close always.
            self._clock.rfc3339(conn.start_ns),
            state=state,
            error=error,
        )
        entry = _Entry(opened=opened, visible=visible, conn=conn)
        self.stats.opened += 1
        if register:
            self._open[conn.conn_id] = entry
            if len(self._open) > _MAX_OPEN:
                evicted, _ = self._open.popitem(last=False)
                self._evicted.add(evicted)
                if len(self._evicted) > _MAX_OPEN:
                    self._evicted.pop()
                self.stats.evicted += 1
        return entry

    def _remember_closed(self, conn_id: int) -> None:
        self._closed.add(conn_id)
        self._closed_order.append(conn_id)
        if len(self._closed_order) > _RECENTLY_CLOSED:
            self._closed.discard(self._closed_order.popleft())
