"""Putting a red packet into Redis: its pool and winners, then the meta that opens it.

A sharded red packet ("shards": K) is pre-split as a whole and dealt: envelope seq goes
to sub-pool seq % K, each a pool of its own (CampaignKeys of its id, its own hash tag),
opened by its own meta; the campaign's meta (the definition, listing the sub-pools) is
written last, once every sub-pool is open.

Creation and rebuild both come through here: the envelopes (and, for a rebuild, the
winners recorded in PostgreSQL) go in pipelined chunks, and only then the meta hash,
whose presence the grab script takes as "open". Until it opens, a pool being loaded
expires (LOAD_TTL_S, renewed by every round trip): a load that dies half way, or whose
creation failed and could not be cleaned up, is collected by Redis itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from app.records import Envelope, Meta
from app.redpacket.spec import RedPacket, pools_of, to_meta, to_pool_meta
from app.reports import Totals
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys

# Values per RPUSH / HSET, and commands per pipeline round trip.
CHUNK = 10_000
CHUNKS_PER_TRIP = 10
Progress = Callable[[int, int], None]
# A pool not opened within this long of its last loaded chunk is abandoned.
LOAD_TTL_S = 600


def deal(campaign: RedPacket, envelopes: Sequence[Envelope]) -> list[list[Envelope]]:
    """``envelopes`` (in order) by sub-pool: seq % shards (one list when not sharded)."""
    shards = campaign.spec.shards
    dealt: list[list[Envelope]] = [[] for _ in range(shards)]
    for envelope in envelopes:
        dealt[envelope.seq % shards].append(envelope)
    return dealt


async def load(
    redis: Redis,
    campaign: RedPacket,
    pool: Sequence[Envelope],
    winners: Mapping[str, Envelope] | None = None,
    progress: Progress | None = None,
) -> None:
    """Replace the campaign's pool (in order) and winners, sub-pool by sub-pool when
    sharded; ``progress(done, total)`` after each round trip."""
    by_winner = list((winners or {}).items())
    total = len(pool) + len(by_winner)
    done = 0
    shards = campaign.spec.shards
    won: list[list[tuple[str, Envelope]]] = [[] for _ in range(shards)]
    for user, envelope in by_winner:
        won[envelope.seq % shards].append((user, envelope))

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for pool_id, envelopes, pool_won in zip(
        pools_of(campaign), deal(campaign, pool), won, strict=True
    ):
        await _load_pool(redis, pool_id, envelopes, pool_won, step)


async def _load_pool(
    redis: Redis,
    pool_id: str,
    pool: Sequence[Envelope],
    won: Sequence[tuple[str, Envelope]],
    step: Callable[[int], None],
) -> None:
    keys = CampaignKeys.of(pool_id)
    await redis.delete(keys.pool, keys.winners)
    trip = CHUNK * CHUNKS_PER_TRIP
    for start in range(0, len(won), trip):
        async with redis.pipeline(transaction=False) as pipe:
            for chunk in range(start, min(start + trip, len(won)), CHUNK):
                part = won[chunk : chunk + CHUNK]
                pipe.hset(keys.winners, mapping={u: e.encode() for u, e in part})
            pipe.expire(keys.winners, LOAD_TTL_S)
            await pipe.execute()
        step(min(trip, len(won) - start))
    for start in range(0, len(pool), trip):
        async with redis.pipeline(transaction=False) as pipe:
            for chunk in range(start, min(start + trip, len(pool)), CHUNK):
                pipe.rpush(keys.pool, *[e.encode() for e in pool[chunk : chunk + CHUNK]])
            pipe.expire(keys.pool, LOAD_TTL_S)
            await pipe.execute()
        step(min(trip, len(pool) - start))


@dataclass(frozen=True, slots=True)
class SubPool:
    """What a sharded red packet's sub-pool opens with: its budget, what was won of it
    (a rebuild), its lifecycle fields."""

    budget: Totals
    won: Totals = Totals()
    lifecycle: Meta = field(default_factory=dict)


async def open_campaign(
    redis: Redis,
    campaign: RedPacket,
    won: Totals = Totals(),
    lifecycle: Meta | None = None,
    sub_pools: Sequence[SubPool] = (),
) -> None:
    """List the campaign for the drainers, then write meta (the script treats its absence
    as "not open", ``lifecycle``: fields a rebuild restores, app.records.encode_lifecycle)
    and keep the loaded pool and winners for good, in one MULTI.

    The list is a key of its own slot on a Redis Cluster, so it is written first, apart:
    a listed campaign without meta is one still loading, which drainers keep following.
    A sharded campaign (``sub_pools``: one per sub-pool, in order) opens each sub-pool so,
    then its own meta, which lists them (``won``: 0, its sub-pools count what is won).
    """
    for shard, (_, sub) in enumerate(zip(campaign.spec.pools, sub_pools, strict=True)):
        await open_sub_pool(redis, campaign, shard, sub)
    await open_meta(redis, campaign, won, lifecycle)


async def load_sub_pool(
    redis: Redis,
    campaign: RedPacket,
    shard: int,
    pool: Sequence[Envelope],
    winners: Mapping[str, Envelope],
) -> None:
    """Replace the pool (in order) and winners of sub-pool ``shard`` alone (a rebuild of
    a lost sub-pool); it opens with ``open_sub_pool``."""
    await _load_pool(redis, campaign.spec.pools[shard], pool, list(winners.items()), _quiet)


def _quiet(done: int) -> None:
    """The progress of a load nobody watches."""


async def open_sub_pool(redis: Redis, campaign: RedPacket, shard: int, sub: SubPool) -> None:
    """Open sub-pool ``shard`` (its meta, as ``open_campaign`` opens each)."""
    budget, taken = (sub.budget.count, sub.budget.fen), (sub.won.count, sub.won.fen)
    meta = to_pool_meta(campaign, shard, budget, taken)
    await _open(redis, campaign.spec.pools[shard], {**meta, **sub.lifecycle})


async def open_meta(
    redis: Redis, campaign: RedPacket, won: Totals = Totals(), lifecycle: Meta | None = None
) -> None:
    """Write the campaign's own meta (``open_campaign``'s last step; alone, a rebuild of
    a sharded campaign's lost meta)."""
    await _open(redis, campaign.id, {**to_meta(campaign, won.count, won.fen), **(lifecycle or {})})


async def _open(redis: Redis, pool_id: str, meta: Meta) -> None:
    keys = CampaignKeys.of(pool_id)
    await redis.sadd(CAMPAIGNS_SET, pool_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.meta, mapping=meta)
        pipe.persist(keys.pool)
        pipe.persist(keys.winners)
        await pipe.execute()


async def discard(redis: Redis, campaign: RedPacket) -> None:
    """Remove whatever a failed creation left of a campaign in Redis."""
    for pool_id in (*campaign.spec.pools, campaign.id):
        keys = CampaignKeys.of(pool_id)
        await redis.delete(keys.meta, keys.pool, keys.winners)
        await redis.srem(CAMPAIGNS_SET, pool_id)
