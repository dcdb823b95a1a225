"""The Batcher: one flush in flight; what arrives meanwhile leaves together as the next."""

from __future__ import annotations

import asyncio

import pytest

from app.store.batching import Batcher


class Flushes:
    """A flush that records each batch and returns when released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await self.release.wait()
        return [item * 10 for item in items]


async def turns(n: int = 3) -> None:
    """Let the loop run ``n`` iterations (a dispatch, its task's start)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_calls_made_while_a_batch_is_in_flight_leave_together_next() -> None:
    flushes = Flushes()
    batcher: Batcher[int, int] = Batcher(flushes, max_size=100)
    first = batcher.submit(1)
    await turns()
    assert flushes.batches == [[1]]
    # Two calls in two later loop iterations, both while the first batch is out.
    later = [batcher.submit(2)]
    await turns()
    later.append(batcher.submit(3))
    await turns()
    assert flushes.batches == [[1]]
    flushes.release.set()
    assert await first == 10
    assert await asyncio.gather(*later) == [20, 30]
    assert flushes.batches == [[1], [2, 3]]
    await batcher.drain()


async def test_a_queue_longer_than_max_size_leaves_in_batches_of_max_size() -> None:
    flushes = Flushes()
    flushes.release.set()
    batcher: Batcher[int, int] = Batcher(flushes, max_size=2)
    futures = [batcher.submit(i) for i in range(5)]
    assert await asyncio.gather(*futures) == [0, 10, 20, 30, 40]
    assert flushes.batches == [[0, 1], [2, 3], [4]]


async def test_a_failed_flush_fails_its_batch_only() -> None:
    calls = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("lost")
        return items

    batcher: Batcher[int, int] = Batcher(flush, max_size=1)
    lost, kept = batcher.submit(1), batcher.submit(2)
    with pytest.raises(ConnectionError):
        await lost
    assert await kept == 2


@pytest.mark.parametrize("started", [True, False], ids=["running", "not yet started"])
async def test_a_cancelled_batch_cancels_its_waiters_and_the_next_batch_still_goes(
    started: bool,
) -> None:
    flushes = Flushes()
    batcher: Batcher[int, int] = Batcher(flushes, max_size=100)
    first = batcher.submit(1)
    # One turn dispatches the batch (its task made, not yet run); more, and it is out.
    await (turns() if started else asyncio.sleep(0))
    second = batcher.submit(2)
    # The shutdown of the batch in flight (its task cancelled), as at a worker's stop.
    in_flight = batcher._in_flight
    assert in_flight is not None
    in_flight.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(first, 5)
    flushes.release.set()
    assert await asyncio.wait_for(second, 5) == 20
    assert flushes.batches == ([[1], [2]] if started else [[2]])


async def test_a_flush_answering_fewer_results_fails_every_waiter() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: Batcher[int, int] = Batcher(short, max_size=100)
    futures = [batcher.submit(i) for i in range(3)]
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 5)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
