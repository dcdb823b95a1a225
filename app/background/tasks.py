"""Background loops started by a worker, and how they are stopped."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_loop(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    """End a background loop that checks ``stop``: set it, cancel the task to cut short
    what it awaits, and wait for it.

    The event, not the cancellation, is what guarantees the end. On Python 3.11 a
    cancellation can be lost inside any redis-py command: it sends through
    ``asyncio.wait_for``, which (before 3.12) returns the result instead of raising
    CancelledError when the send completes in the same loop turn as the cancel. A loop
    stopped by cancellation alone then runs on, and shutdown waits for it forever.
    """
    stop.set()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
