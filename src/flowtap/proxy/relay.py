"""Byte relay between two channels, both ways, until both are done or the pair goes idle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection

from flowtap.proxy.channel import Channel, ChannelClosedError

__all__ = ["Tap", "pump", "relay", "supervise"]

Tap = Callable[[bytes], None]  # sees every piece relayed in one direction


async def pump(src: Channel, dst: Channel, tap: Tap, activity: list[float]) -> None:
    """src -> dst until src's end, which is passed on as a half-close."""
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


async def supervise(
    tasks: Collection[asyncio.Future[None]],
    activity: list[float],
    idle_timeout: float,
    stop: Callable[[], bool] | None = None,
) -> bool:
    """Waits for a pair's two directions; ends both when one fails (a peer went away while
    we wrote to it), when ``stop()`` says so, or when neither moved for ``idle_timeout``.
    Returns False for the last. What is left is cancelled and awaited."""
    loop = asyncio.get_running_loop()
    pending = set(tasks)
    idle = False
    try:
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=min(idle_timeout, 5.0), return_when=asyncio.FIRST_COMPLETED
            )
            if any(t.exception() is not None for t in done) or (stop is not None and stop()):
                break
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
    return not idle


async def relay(a: Channel, b: Channel, tap_ab: Tap, tap_ba: Tap, *, idle_timeout: float) -> bool:
    """Relay a->b and b->a (what is already buffered first). Returns False when the pair was
    closed for being idle ``idle_timeout`` seconds in both directions."""
    activity = [asyncio.get_running_loop().time()]
    tasks = {
        asyncio.ensure_future(pump(a, b, tap_ab, activity)),
        asyncio.ensure_future(pump(b, a, tap_ba, activity)),
    }
    try:
        return await supervise(tasks, activity, idle_timeout)
    finally:
        a.close()
        b.close()
