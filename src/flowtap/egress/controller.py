"""The egress controller as the sensor runs it: the proxy on its own thread and event
loop, the redirection in the kernel, and the proxy's reports handed to the sensor's
thread through a queue (the sensor alone builds and writes records)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import uvloop

from flowtap.config import SensorConfig
from flowtap.egress.occupancy import describe, egress_occupants
from flowtap.egress.redirect import EgressRedirect, Origin
from flowtap.egress.sockets import socket_owner
from flowtap.events import Task
from flowtap.loader.errors import BpfError
from flowtap.loader.libbpf import BpfMap
from flowtap.loader.system import cgroup2_mount
from flowtap.protocols.messages import Transaction
from flowtap.proxy.ca import CAError, CertificateAuthority
from flowtap.proxy.events import ConnectionEvent, ProxyContext
from flowtap.proxy.forward import Limits
from flowtap.proxy.original_dst import so_original_dst
from flowtap.proxy.server import EgressProxy, ProxyConfig
from flowtap.records.connection import Record, process_record
from flowtap.records.http import HttpRecordOptions
from flowtap.tracking.processes import ProcessInfo, ProcessRegistry, in_cgroup

log = logging.getLogger("flowtap.egress")

# Proxied connections get ids of their own, far above the kernel's (which count from 1).
FIRST_CONNECTION_ID = 1 << 48
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_MAX_CLIENTS = 4096

Report = tuple[Transaction, ProxyContext] | ConnectionEvent


class EgressError(RuntimeError):
    """The controller could not start; the message says what to do."""


class EgressController:
    """`in_scope(info)` says whether a client process passes the sensor's filters; it is
    asked on the proxy's thread when a connection arrives, while the client is alive."""

    def __init__(
        self,
        config: SensorConfig,
        strategies: BpfMap,
        http: HttpRecordOptions,
        in_scope: Callable[[ProcessInfo], bool],
    ) -> None:
        self._config = config
        self._strategies = strategies
        self._http = http
        self._in_scope = in_scope
        # The proxy thread's own view of processes (the sensor's registry is not shared
        # across threads), and what it found per client pid, for the sensor's thread.
        self._processes = ProcessRegistry()
        self._clients: OrderedDict[int, tuple[Record, bool]] = OrderedDict()
        self._clients_lock = threading.Lock()
        self.reports: queue.SimpleQueue[Report] = queue.SimpleQueue()
        # uvloop: about 1.4x the requests/s of asyncio's own loop through the proxy.
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="egress", daemon=True)
        self._proxy: EgressProxy | None = None
        self._redirect: EgressRedirect | None = None
        self.cgroup: Path | None = None
        self.uses_getsockopt = False
        self._kernel_counters: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------------

    def set_capture(self, http: HttpRecordOptions) -> None:
        """What a reloaded configuration asks the proxy to parse and keep."""
        self._http = http
        if self._proxy is not None:
            self._proxy.set_capture(http)

    def start(self) -> None:
        cfg = self._config
        try:
            ca = CertificateAuthority.load_or_create(cfg.egress_state_dir)
            if cfg.trust_store is not None:
                written = ca.export_trust_store(cfg.trust_store)
                log.info("CA certificate for clients to trust: %s", ", ".join(map(str, written)))
        except CAError as exc:
            raise EgressError(str(exc)) from exc
        upstream_ca = str(cfg.upstream_ca_file) if cfg.upstream_ca_file else None
        self._proxy = EgressProxy(
            ProxyConfig(
                explicit_port=cfg.proxy_port,
                upstream_ca_file=upstream_ca,
                http=self._http,
                limits=Limits(header_timeout=cfg.proxy_header_timeout_s),
            ),
            ca,
            on_transaction=lambda tx, ctx: self.reports.put((tx, ctx)),
            on_connection=self.reports.put,
            original_destination=self._original_destination,
            client_process=self._client_process,
            connection_ids=itertools.count(FIRST_CONNECTION_ID),
        )
        self._thread.start()
        try:
            self._call(self._proxy.start())
        except OSError as exc:
            self.stop()
            raise EgressError(
                f"the proxy cannot listen: {exc.strerror or exc}; choose another --proxy-port"
            ) from exc
        transparent = self._proxy.transparent_address
        assert transparent is not None
        self.cgroup = cfg.egress_cgroup or cgroup2_mount()
        if self.cgroup is None:
            self.stop()
            raise EgressError("--egress needs cgroup v2, and no cgroup2 filesystem is mounted")
        self._refuse_if_occupied(self.cgroup)
        # SO_ORIGINAL_DST is answered for sockets in the cgroup: ours must be there.
        self.uses_getsockopt = in_cgroup(os.getpid(), self.cgroup)
        if not self.uses_getsockopt:
            log.info(
                "flowtap runs outside --egress-cgroup %s: the proxy reads original "
                "destinations from the kernel's table instead of SO_ORIGINAL_DST",
                self.cgroup,
            )
        try:
            self._redirect = EgressRedirect(self.cgroup, transparent[1], self._strategies)
        except BpfError:
            self.stop()
            raise
        if self._proxy.explicit_address is not None:
            host, port = self._proxy.explicit_address
            log.info(
                "egress proxy: transparent on port %d; explicit proxy on http://%s:%d "
                "(HTTP_PROXY/HTTPS_PROXY)",
                transparent[1],
                host,
                port,
            )

    def _refuse_if_occupied(self, cgroup: Path) -> None:
        """Another sensor's redirection on this cgroup (or over or under it) would take the
        connections this one is meant to record: refuse to start rather than record nothing."""
        try:
            occupants = egress_occupants(cgroup)
        except OSError as exc:
            # Attaching fails on its own, with its own message, if the cgroup is unusable;
            # if only the query is refused, say that the check could not be made.
            log.warning(
                "cannot check whether another flowtap --egress covers %s (%s): if one does, "
                "this sensor records nothing of what that one proxies",
                cgroup,
                exc.strerror or exc,
            )
            return
        if occupants:
            self.stop()
            raise EgressError(describe(occupants, cgroup))

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Any, timeout: float = _START_TIMEOUT_S) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def stop(self) -> None:
        """Idempotent; the counters stay readable afterwards."""
        if self._redirect is not None:
            self._kernel_counters = self._redirect.counters()
            self._redirect.close()  # first: new connections go direct again
            self._redirect = None
        if self._proxy is not None and self._thread.is_alive():
            try:
                self._call(self._proxy.stop(), _STOP_TIMEOUT_S)
            except Exception as exc:  # stopping must go on whatever happened
                log.warning("the egress proxy did not stop cleanly: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_STOP_TIMEOUT_S)

    # -- what the proxy asks (on its thread) --------------------------------------------

    def _original_destination(self, sock: socket.socket) -> tuple[str, int]:
        if self.uses_getsockopt:
            return so_original_dst(sock)
        origin = self._origin(sock.getpeername()[:2])
        if origin is None:
            raise OSError("not a redirected connection")
        return origin.address, origin.port

    def _client_process(self, peer: tuple[str, int]) -> int | None:
        origin = self._origin(peer)
        pid = origin.pid if origin is not None else socket_owner(peer)  # explicit: /proc
        if pid is None:
            return None
        info = self._processes.lookup(Task(pid=pid, tid=pid, uid=0, comm=""))
        with self._clients_lock:
            self._clients[pid] = (process_record(info, pid), self._in_scope(info))
            self._clients.move_to_end(pid)
            while len(self._clients) > _MAX_CLIENTS:
                self._clients.popitem(last=False)
        return pid

    def client(self, pid: int | None) -> tuple[Record, bool] | None:
        """The client process's record and whether it is in the sensor's scope, as found
        when its connection arrived; None when the client is not known."""
        if pid is None:
            return None
        with self._clients_lock:
            return self._clients.get(pid)

    def _origin(self, peer: tuple[str, int]) -> Origin | None:
        redirect = self._redirect
        return redirect.origin(peer) if redirect is not None else None

    # -- accounting ---------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self._proxy is not None:
            out.update(self._proxy.counters())
        kernel = self._redirect.counters() if self._redirect else self._kernel_counters
        out.update({f"kernel_{k}": v for k, v in kernel.items()})
        return out

    def transparent_addresses(self) -> list[tuple[str, int]]:
        """Where redirected connections arrive, as the socket layer sees their remote."""
        if self._proxy is None or self._proxy.transparent_address is None:
            return []
        port = self._proxy.transparent_address[1]
        return [("127.0.0.1", port), ("::1", port), ("::ffff:127.0.0.1", port)]

    @property
    def explicit_address(self) -> tuple[str, int] | None:
        return self._proxy.explicit_address if self._proxy else None
