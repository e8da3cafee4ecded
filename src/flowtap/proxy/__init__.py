"""The egress controller's proxy: transparent and explicit HTTP(S) proxying with local TLS
termination, feeding the same passive parsers (and records) as the eBPF capture."""

from flowtap.proxy.ca import CAError, CertificateAuthority, Leaf
from flowtap.proxy.events import (
    ConnectionEvent,
    ConnectionHandler,
    Mode,
    Outcome,
    ProxyContext,
    ProxyStats,
    TransactionHandler,
)
from flowtap.proxy.forward import Limits
from flowtap.proxy.original_dst import so_original_dst
from flowtap.proxy.records import (
    connection_context,
    egress_connection_record,
    egress_http_record,
)
from flowtap.proxy.server import ClientProcess, EgressProxy, OriginalDestination, ProxyConfig

__all__ = [
    "CAError",
    "CertificateAuthority",
    "ClientProcess",
    "ConnectionEvent",
    "ConnectionHandler",
    "EgressProxy",
    "Leaf",
    "Limits",
    "Mode",
    "OriginalDestination",
    "Outcome",
    "ProxyConfig",
    "ProxyContext",
    "ProxyStats",
    "TransactionHandler",
    "connection_context",
    "egress_connection_record",
    "egress_http_record",
    "so_original_dst",
]
