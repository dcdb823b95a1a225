"""Putting a red packet into Redis: its pool and winners, then the meta that opens it.

Creation and rebuild both come through here: the envelopes (and, for a rebuild, the
winners recorded in PostgreSQL) go in pipelined chunks, and only then the meta hash,
whose presence the grab script takes as "open". Until it opens, a pool being loaded
expires (LOAD_TTL_S, renewed by every round trip): a load that dies half way, or whose
creation failed and could not be cleaned up, is collected by Redis itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from redis.asyncio import Redis

from app.records import Envelope, Meta
from app.redpacket.spec import RedPacket, to_meta
from app.reports import Totals
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys

# Values per RPUSH / HSET, and commands per pipeline round trip.
CHUNK = 10_000
CHUNKS_PER_TRIP = 10
Progress = Callable[[int, int], None]
# A pool not opened within this long of its last loaded chunk is abandoned.
LOAD_TTL_S = 600


async def load(
    redis: Redis,
    campaign: RedPacket,
    pool: Sequence[Envelope],
    winners: Mapping[str, Envelope] | None = None,
    progress: Progress | None = None,
) -> None:
    """Replace the campaign's pool (in order) and winners; ``progress(done, total)``
    after each round trip."""
    keys = CampaignKeys.of(campaign.id)
    await redis.delete(keys.pool, keys.winners)
    won = list((winners or {}).items())
    total = len(pool) + len(won)
    done = 0
    step = CHUNK * CHUNKS_PER_TRIP
    for start in range(0, len(won), step):
        async with redis.pipeline(transaction=False) as pipe:
            for chunk in range(start, min(start + step, len(won)), CHUNK):
                part = won[chunk : chunk + CHUNK]
                pipe.hset(keys.winners, mapping={u: e.encode() for u, e in part})
            pipe.expire(keys.winners, LOAD_TTL_S)
            await pipe.execute()
        done += min(step, len(won) - start)
        if progress is not None:
            progress(done, total)
    for start in range(0, len(pool), step):
        async with redis.pipeline(transaction=False) as pipe:
            for chunk in range(start, min(start + step, len(pool)), CHUNK):
                pipe.rpush(keys.pool, *[e.encode() for e in pool[chunk : chunk + CHUNK]])
            pipe.expire(keys.pool, LOAD_TTL_S)
            await pipe.execute()
        done += min(step, len(pool) - start)
        if progress is not None:
            progress(done, total)


async def open_campaign(
    redis: Redis, campaign: RedPacket, won: Totals = Totals(), lifecycle: Meta | None = None
) -> None:
    """List the campaign for the drainers, then write meta (the script treats its absence
    as "not open", ``lifecycle``: fields a rebuild restores, app.records.encode_lifecycle)
    and keep the loaded pool and winners for good, in one MULTI.

    The list is a key of its own slot on a Redis Cluster, so it is written first, apart:
    a listed campaign without meta is one still loading, which drainers keep following.
    """
    keys = CampaignKeys.of(campaign.id)
    await redis.sadd(CAMPAIGNS_SET, campaign.id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.meta, mapping={**to_meta(campaign, won.count, won.fen), **(lifecycle or {})})
        pipe.persist(keys.pool)
        pipe.persist(keys.winners)
        await pipe.execute()


async def discard(redis: Redis, campaign_id: str) -> None:
    """Remove whatever a failed creation left of a campaign in Redis."""
    keys = CampaignKeys.of(campaign_id)
    await redis.delete(keys.meta, keys.pool, keys.winners)
    await redis.srem(CAMPAIGNS_SET, campaign_id)
