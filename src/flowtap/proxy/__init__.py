"""The egress controller's proxy: transparent and explicit HTTP(S) proxying with local TLS
termination, feeding the same passive parsers (and records) as the eBPF capture.

Names are imported on first use (PEP 562): the sensor reads a few of its record helpers
on every start, and the proxy's TLS machinery (cryptography) costs seconds to import on
a slow machine that never runs the proxy.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # re-exported for type checkers; imported on use at run time
    from flowtap.proxy.ca import CAError as CAError
    from flowtap.proxy.ca import CertificateAuthority as CertificateAuthority
    from flowtap.proxy.ca import Leaf as Leaf
    from flowtap.proxy.events import ConnectionEvent as ConnectionEvent
    from flowtap.proxy.events import ConnectionHandler as ConnectionHandler
    from flowtap.proxy.events import Mode as Mode
    from flowtap.proxy.events import Outcome as Outcome
    from flowtap.proxy.events import ProxyContext as ProxyContext
    from flowtap.proxy.events import ProxyStats as ProxyStats
    from flowtap.proxy.events import TransactionHandler as TransactionHandler
    from flowtap.proxy.forward import Limits as Limits
    from flowtap.proxy.original_dst import so_original_dst as so_original_dst
    from flowtap.proxy.records import connection_context as connection_context
    from flowtap.proxy.records import egress_connection_record as egress_connection_record
    from flowtap.proxy.records import egress_http_record as egress_http_record
    from flowtap.proxy.server import ClientProcess as ClientProcess
    from flowtap.proxy.server import EgressProxy as EgressProxy
    from flowtap.proxy.server import OriginalDestination as OriginalDestination
    from flowtap.proxy.server import ProxyConfig as ProxyConfig

_WHERE = {
    "CAError": "ca",
    "CertificateAuthority": "ca",
    "Leaf": "ca",
    "ConnectionEvent": "events",
    "ConnectionHandler": "events",
    "Mode": "events",
    "Outcome": "events",
    "ProxyContext": "events",
    "ProxyStats": "events",
    "TransactionHandler": "events",
    "Limits": "forward",
    "so_original_dst": "original_dst",
    "connection_context": "records",
    "egress_connection_record": "records",
    "egress_http_record": "records",
    "ClientProcess": "server",
    "EgressProxy": "server",
    "OriginalDestination": "server",
    "ProxyConfig": "server",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
