"""Coalescing of concurrent calls into one Redis round trip.

While a batch is in flight, new calls queue up; when it returns, everything queued
goes out as the next batch. An idle system therefore adds no delay (the first call
leaves on the next loop iteration), and a busy one sends fewer, larger batches.

One batch in flight, not two: larger batches, so fewer round trips, each a system call
and a wake-up of Redis (measured: docs/benchmarks.md, "Issue 17, fourth pass").
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Collects items submitted concurrently and settles them with one ``flush`` call,
    one call at a time."""

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_size: int,
    ) -> None:
        self._flush = flush
        self._max_size = max_size
        # Items queued and their futures, side by side (no pair object per item).
        self._items: list[T] = []
        self._futures: list[asyncio.Future[R]] = []
        self._in_flight: asyncio.Task[None] | None = None
        self._scheduled = False
        # The loop of the first submit, kept: asyncio.get_running_loop() makes a getpid
        # system call each time on Python 3.11, measured (py-spy --native under ./hb
        # bench) at about 3 % of a worker's CPU on the grab path with a call per submit.
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; await the future for its result.

        A plain function returning the future, not a coroutine: on the hot path every
        layer of coroutine costs a frame to create and one to resume."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return future

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._items and self._in_flight is None:
            size = self._max_size
            items, futures = self._items[:size], self._futures[:size]
            del self._items[:size], self._futures[:size]
            task = self._running_loop().create_task(self._run(items, futures))
            self._in_flight = task
            task.add_done_callback(functools.partial(self._done, futures))

    def _done(self, futures: list[asyncio.Future[R]], task: asyncio.Task[None]) -> None:
        self._in_flight = None
        if task.cancelled():
            # The batch was cancelled (a shutdown), perhaps before its first step: so is
            # every wait for it, none left hanging.
            for future in futures:
                future.cancel()
        if self._items and not self._scheduled:
            self._scheduled = True
            self._running_loop().call_soon(self._dispatch)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # Dispatching always follows a submit, which kept the loop.
        assert self._loop is not None
        return self._loop

    async def _run(self, items: list[T], futures: list[asyncio.Future[R]]) -> None:
        try:
            results = await self._flush(items)
            if len(results) != len(futures):
                raise RuntimeError(f"a batch of {len(futures)} got {len(results)} results")
        except Exception as exc:  # every waiter of this batch sees the failure
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def drain(self) -> None:
        """Wait until nothing is queued or in flight."""
        while self._items or self._in_flight is not None:
            if self._in_flight is not None:
                await asyncio.wait({self._in_flight})
            else:
                await asyncio.sleep(0)


class KeyedBatchers(Generic[T, R]):
    """One Batcher per key (a campaign id), made on first use; ``flush`` gets the key."""

    def __init__(
        self, flush: Callable[[str, list[T]], Awaitable[list[R]]], *, max_size: int
    ) -> None:
        self._flush = flush
        self._max_size = max_size
        self._batchers: dict[str, Batcher[T, R]] = {}

    def submit(self, key: str, item: T) -> asyncio.Future[R]:
        """Queue ``item`` in the batch of ``key``; await the future for its result."""
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = Batcher(functools.partial(self._flush, key), max_size=self._max_size)
            self._batchers[key] = batcher
        return batcher.submit(item)

    async def drain(self) -> None:
        """Wait until no key has anything queued or in flight."""
        for batcher in list(self._batchers.values()):
            await batcher.drain()
