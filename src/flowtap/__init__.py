"""flowtap: every connection on the host, attributed to its process, seen through eBPF."""

__version__ = "0.1.0"
