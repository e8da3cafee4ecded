"""Byte relay between two channels, both ways, until both are done or the pair goes idle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from flowtap.proxy.channel import Channel, ChannelClosedError

__all__ = ["Tap", "relay"]

Tap = Callable[[bytes], None]  # sees every piece relayed in one direction


async def _pump(src: Channel, dst: Channel, tap: Tap, activity: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        if not src.buf and not await src.fill() and not src.buf:
            dst.write_eof()  # pass the half-close on; the other direction may go on
            return
        data = src.take(len(src.buf))
        activity[0] = loop.time()
        dst.write(data)
        tap(data)
        await dst.drain()


async def relay(a: Channel, b: Channel, tap_ab: Tap, tap_ba: Tap, *, idle_timeout: float) -> bool:
    """Relay a->b and b->a (what is already buffered first). Returns False when the pair was
    closed for being idle ``idle_timeout`` seconds in both directions."""
    loop = asyncio.get_running_loop()
    activity = [loop.time()]
    tasks = {
        asyncio.ensure_future(_pump(a, b, tap_ab, activity)),
        asyncio.ensure_future(_pump(b, a, tap_ba, activity)),
    }
    pending = tasks
    idle = False
    try:
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=min(idle_timeout, 5.0), return_when=asyncio.FIRST_EXCEPTION
            )
            if any(t.exception() is not None for t in done):
                break  # a peer went away while we wrote to it: end both directions
            if pending and loop.time() - activity[0] >= idle_timeout:
                idle = True
                break
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ChannelClosedError, OSError):
                await task
        a.close()
        b.close()
    return not idle
