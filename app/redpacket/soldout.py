"""What a worker knows about sold-out red packets, so it can answer their grabs itself.

Once a red packet's pool is empty it stays empty (only ``rebuild`` refills a pool, and
it publishes ``reset``), and its winners never change again. The worker whose script
call emptied the pool publishes ``sold_out`` (app.background.events); every worker then loads the
winners' openids into a ``WinnersIndex`` in the background. From then on a grab by
anyone not in the index is answered "sold out" from memory, with no Redis call; a grab
by someone in it (a winner asking again, or a rare hash collision) is confirmed in
Redis, which returns the amount won. The knowledge is used only while the worker's
event listener is live, and is dropped whenever it resubscribes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from array import array

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.background.events import Events
from app.store.scripts import CampaignKeys

log = logging.getLogger("hongbao.soldout")

SCAN_COUNT = 10_000


class WinnersIndex:
    """The winners of a sold-out campaign as sorted 64-bit hashes of their openids.

    ``hash`` of bytes is keyed per process (PYTHONHASHSEED), so nobody outside can
    choose an openid that collides; a collision would only cost a Redis lookup, since
    every hit is confirmed there. 8 bytes per winner: 40 MB for 5 million.
    """

    def __init__(self, hashes: array[int]) -> None:
        self._hashes = hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, openid: str) -> bool:
        h = hash(openid.encode())
        i = bisect.bisect_left(self._hashes, h)
        return i < len(self._hashes) and self._hashes[i] == h

    @classmethod
    async def load(cls, redis: Redis, campaign_id: str) -> WinnersIndex:
        """Scan the winners hash of ``campaign_id`` (a few thousand per call)."""
        key = CampaignKeys.of(campaign_id).winners
        hashes: list[int] = []
        cursor = 0
        while True:
            cursor, chunk = await redis.hscan(key, cursor, count=SCAN_COUNT)
            hashes.extend(map(hash, chunk))
            if cursor == 0:
                break
        hashes.sort()
        return cls(array("q", hashes))


class SoldOut:
    """The red packets this worker knows to be sold out, with their winners once loaded."""

    def __init__(self, redis: Redis, events: Events) -> None:
        self._redis = redis
        self._events = events
        # campaign -> its winners, or None while they load.
        self._known: dict[str, WinnersIndex | None] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._announcing: set[asyncio.Task[None]] = set()
        events.on("sold_out", self._learn)
        events.on("reset", self._forget)
        events.on_resync(self._forget_all)

    def knows(self, campaign_id: str) -> bool:
        """Whether ``campaign_id`` is sold out, as far as this worker coherently knows."""
        return self._events.live and campaign_id in self._known

    def surely_lost(self, campaign_id: str, openid: str) -> bool:
        """Whether ``openid`` certainly won nothing in ``campaign_id`` (known sold out)."""
        index = self._known.get(campaign_id)
        return index is not None and openid not in index

    def announce(self, campaign_id: str) -> None:
        """This worker saw the pool of ``campaign_id`` run out: tell every worker."""
        if campaign_id in self._known:
            return
        task = asyncio.get_running_loop().create_task(self._publish(campaign_id))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _publish(self, campaign_id: str) -> None:
        try:
            await self._events.publish("sold_out", campaign_id)
        except RedisError as exc:
            # The others find out with their own next script call.
            log.warning("could not announce %s sold out: %r", campaign_id, exc)

    def _learn(self, campaign_id: str) -> None:
        if campaign_id in self._known:
            return
        self._known[campaign_id] = None
        task = asyncio.get_running_loop().create_task(self._load(campaign_id))
        self._loading[campaign_id] = task
        task.add_done_callback(lambda _: self._loading.pop(campaign_id, None))

    async def _load(self, campaign_id: str) -> None:
        try:
            index = await WinnersIndex.load(self._redis, campaign_id)
        except RedisError as exc:
            # Grabs keep confirming in Redis; the next sold_out or resync retries.
            log.warning("could not load the winners of %s: %r", campaign_id, exc)
            self._known.pop(campaign_id, None)
            return
        if campaign_id in self._known:
            self._known[campaign_id] = index

    def _forget(self, campaign_id: str) -> None:
        self._known.pop(campaign_id, None)
        task = self._loading.pop(campaign_id, None)
        if task is not None:
            task.cancel()

    async def _forget_all(self) -> None:
        for campaign_id in list(self._known):
            self._forget(campaign_id)

    async def close(self) -> None:
        """Stop loading and announcing (shutdown)."""
        tasks = [*self._loading.values(), *self._announcing]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
