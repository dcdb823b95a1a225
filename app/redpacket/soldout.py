"""What a worker knows about sold-out red packets, so it can answer their grabs itself.

Once a red packet's pool is empty it stays empty (only ``rebuild`` refills a pool, and
it publishes ``reset``), and its winners never change again. The worker whose script
call emptied the pool publishes ``sold_out`` (app.background.events); every worker then loads the
winners' openids into a ``WinnersIndex`` in the background. From then on a grab by
anyone not in the index is answered "sold out" from memory, with no Redis call; a grab
by someone in it (a winner asking again, or a rare hash collision) is confirmed in
Redis, which returns the amount won. The knowledge is used only while the worker's
event listener is live, and is dropped whenever it resubscribes.

The index is built without stalling the event loop: HSCAN in chunks of ``SCAN_COUNT``,
each chunk folded into a bit array (a Bloom filter: three bits per openid out of 16 per
winner) with no sort and no big transient list, the loop free between chunks. 2 bytes
per winner (20 MB for 10 million), at most ``MAX_INDEX_BYTES`` per campaign and
``MAX_TOTAL_BYTES`` in all: past that the least recently used index is evicted, and so
is the index of a campaign that has ended, at its next grab. Knowledge is per pool: a
sharded red packet's sub-pools are known sold out one by one, by their ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.background.events import Events
from app.redpacket.spec import RedPacket
from app.store.scripts import CampaignKeys

log = logging.getLogger("hongbao.soldout")

# Fields per HSCAN: each chunk is about a millisecond of Python on the loop, so even
# on a CPU shared with other busy processes no chunk holds the loop near 50 ms.
SCAN_COUNT = 1_000
BITS_PER_WINNER = 16
PROBES = 3
MIN_INDEX_BYTES = 8 * 1024
MAX_INDEX_BYTES = 32 * 1024 * 1024
MAX_TOTAL_BYTES = 128 * 1024 * 1024


def _index_bytes(winners: int) -> int:
    """A power of two of bytes holding ``BITS_PER_WINNER`` bits per winner, within bounds."""
    size = MIN_INDEX_BYTES
    while size * 8 < winners * BITS_PER_WINNER and size < MAX_INDEX_BYTES:
        size *= 2
    return size


class WinnersIndex:
    """The winners of a sold-out campaign as a Bloom filter over hashes of their openids.

    Every winner is in it; a non-winner is in it with a probability of about 0.5 % (at
    16 bits per winner), which costs only a Redis lookup, since every hit is confirmed
    there. ``hash`` of bytes is keyed per process (PYTHONHASHSEED), so nobody outside
    can choose openids that collide.
    """

    def __init__(self, size_bytes: int) -> None:
        self._bits = bytearray(size_bytes)
        self._mask = size_bytes * 8 - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Memory held by the bit array."""
        return len(self._bits)

    def add_all(self, openids: list[bytes]) -> None:
        """Add a chunk of winners' openids."""
        bits, mask = self._bits, self._mask
        for openid in openids:
            h = hash(openid)
            # Kirsch-Mitzenmacher: probe i is h1 + i * h2, from two halves of one hash.
            h1, h2 = h & 0xFFFFFFFF, ((h >> 32) & 0xFFFFFFFF) | 1
            for i in range(PROBES):
                bit = (h1 + i * h2) & mask
                bits[bit >> 3] |= 1 << (bit & 7)
        self._count += len(openids)

    def __contains__(self, openid: str) -> bool:
        h = hash(openid.encode())
        h1, h2 = h & 0xFFFFFFFF, ((h >> 32) & 0xFFFFFFFF) | 1
        bits, mask = self._bits, self._mask
        for i in range(PROBES):
            bit = (h1 + i * h2) & mask
            if not bits[bit >> 3] & (1 << (bit & 7)):
                return False
        return True

    @classmethod
    async def load(cls, redis: Redis, campaign_id: str) -> WinnersIndex:
        """Scan the winners hash of ``campaign_id`` in chunks, yielding the loop between."""
        key = CampaignKeys.of(campaign_id).winners
        index = cls(_index_bytes(await redis.hlen(key)))
        cursor = 0
        while True:
            cursor, chunk = await redis.hscan(key, cursor, count=SCAN_COUNT)
            index.add_all(list(cast(dict[bytes, bytes], chunk)))
            if cursor == 0:
                return index
            # A chunk answered from a buffer would not yield: give the loop its turn.
            await asyncio.sleep(0)


class SoldOut:
    """The red packets this worker knows to be sold out, with their winners once loaded."""

    def __init__(self, redis: Redis, events: Events) -> None:
        self._redis = redis
        self._events = events
        # campaign -> its winners, or None while they load (or once evicted); least
        # recently used first.
        self._known: OrderedDict[str, WinnersIndex | None] = OrderedDict()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._announcing: set[asyncio.Task[None]] = set()
        events.on("sold_out", self._learn)
        events.on("reset", self._forget)
        events.on_resync(self._forget_all)

    def knows(self, campaign: RedPacket, campaign_id: str) -> bool:
        """Whether the pool ``campaign_id`` of ``campaign`` (its own, or one of its
        sub-pools) is sold out, as far as this worker coherently knows.

        An ended campaign is forgotten here: its grabs are refused before the index
        would be consulted, so keeping it only holds memory.
        """
        if campaign_id not in self._known:
            return False
        if campaign.closes_ms <= time.time() * 1000:
            self._forget(campaign_id)
            return False
        self._known.move_to_end(campaign_id)
        return self._events.live

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
            self._evict(keep=campaign_id)

    def _evict(self, keep: str) -> None:
        """Drop the least recently used indexes past MAX_TOTAL_BYTES (they stay known
        sold out: their grabs are confirmed in Redis)."""
        total = sum(index.nbytes for index in self._known.values() if index is not None)
        for campaign_id in list(self._known):
            if total <= MAX_TOTAL_BYTES:
                return
            index = self._known[campaign_id]
            if campaign_id != keep and index is not None:
                total -= index.nbytes
                self._known[campaign_id] = None

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
