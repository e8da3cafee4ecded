"""QPOINT_STRATEGY from an environment block, as /proc/PID/environ holds it."""

from __future__ import annotations

import pytest

from flowtap.egress.strategy import Strategy, strategy_of_environment


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (b"PATH=/bin\0QPOINT_STRATEGY=forward\0HOME=/root\0", Strategy.FORWARD),
        (b"QPOINT_STRATEGY=ignore", Strategy.IGNORE),
        (b"QPOINT_STRATEGY=ignore\0", Strategy.IGNORE),
        (b"HOME=/\0", Strategy.OBSERVE),
        (b"", Strategy.OBSERVE),
        # Only whole names and whole values count, and the first entry wins (as in the kernel).
        (b"XQPOINT_STRATEGY=forward\0", Strategy.OBSERVE),
        (b"QPOINT_STRATEGY=forwarded\0", Strategy.OBSERVE),
        (b"QPOINT_STRATEGY=Forward\0", Strategy.OBSERVE),
        (b"QPOINT_STRATEGY=\0QPOINT_STRATEGY=forward\0", Strategy.OBSERVE),
        (b"QPOINT_STRATEGY=ignore\0QPOINT_STRATEGY=forward\0", Strategy.IGNORE),
        # Truncated or binary garbage never raises.
        (b"QPOINT_STRAT", Strategy.OBSERVE),
        (b"\xff\xfe\0QPOINT_STRATEGY=forward", Strategy.FORWARD),
    ],
)
def test_strategy_of_environment(environ: bytes, expected: Strategy) -> None:
    assert strategy_of_environment(environ) is expected
