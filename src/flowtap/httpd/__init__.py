"""The sensor's own HTTP endpoints (--httpd-listen): /healthz, /readyz and /metrics, served
on threads of their own so that no client can stall the ring-buffer consumer."""
