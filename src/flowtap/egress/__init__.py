"""Egress controller: QPOINT_STRATEGY per process, transparent redirection of forward
processes' TCP to the local proxy (flowtap.proxy), and the records it makes."""
