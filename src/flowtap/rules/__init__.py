"""Qtap-compatible rule expressions: parse once, evaluate per transaction."""
