"""The rate limit every payout process shares, held in Redis (lua/take_payout_slot.lua)."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from app.store.scripts import PAYOUT_PAUSE_KEY, PAYOUT_RATE_KEY, load_lua


class SharedLimit:
    """At most ``rate_per_s`` calls of each kind per second across all processes, and
    a pause any of them may set for all."""

    def __init__(self, redis: Redis, rate_per_s: int) -> None:
        self._redis = redis
        self._spacing_us = 1_000_000 // rate_per_s
        self._take = redis.register_script(load_lua("take_payout_slot"))

    async def preload(self) -> None:
        """SCRIPT LOAD, so a broken script stops start-up."""
        await self._redis.script_load(self._take.script)

    async def acquire(self, call: str) -> None:
        """Wait until a call of kind ``call`` may go.

        The call reserves the next slot (slots are 1/rate apart across every process)
        and sleeps until it. One that wakes up more than half a spacing late (a busy
        event loop) gives the slot up and reserves again, so every call goes within
        half a spacing of a slot of its own and no second ever holds more than rate + 1.
        """
        while True:
            paused, wait_us = await self._take(
                keys=[PAYOUT_RATE_KEY + call, PAYOUT_PAUSE_KEY], args=[self._spacing_us]
            )
            due = time.monotonic() + int(wait_us) / 1_000_000
            await asyncio.sleep(int(wait_us) / 1_000_000)
            if int(paused):
                continue
            if time.monotonic() - due <= self._spacing_us / 2_000_000:
                return

    async def pause(self, seconds: float) -> None:
        """Hold every payout process for ``seconds`` (never shortening a longer pause)."""
        ms = max(1, int(seconds * 1000))
        current = int(await self._redis.pttl(PAYOUT_PAUSE_KEY))
        if current < ms:
            await self._redis.set(PAYOUT_PAUSE_KEY, "1", px=ms)
