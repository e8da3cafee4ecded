"""Native TLS: find TLS libraries in processes' memory and attach the plaintext probes."""
