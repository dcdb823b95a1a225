"""The ledger lag: entries settled in Redis, not yet recorded in PostgreSQL.

On a Redis Cluster each campaign's stream lives on the master of its slot: the lag is
also reported per master (``hongbao_shard_ledger_lag``), so a shard whose streams grow
(its drainer reads failing, its master slow) shows as itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.metrics import Metrics
from app.store.client import cluster_of
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys, pool_owner

log = logging.getLogger("hongbao.lag")

# How often each worker samples the ledger lag for its /metrics gauge.
LAG_SAMPLE_S = 1.0


async def ledger_lag(redis: Redis) -> int:
    """Entries in every campaign's ledger stream: settled, not yet in PostgreSQL."""
    return sum((await ledger_lag_by_campaign(redis)).values())


async def ledger_lag_by_campaign(redis: Redis) -> dict[str, int]:
    """Entries in each campaign's ledger stream, by campaign id (a sharded red packet's
    sub-pools' streams summed)."""
    return by_campaign_of(await ledger_lag_by_pool(redis))


def by_campaign_of(by_pool: dict[str, int]) -> dict[str, int]:
    """Lag by pool summed by the campaign each pool belongs to."""
    by_campaign: dict[str, int] = {}
    for pool, n in by_pool.items():
        campaign_id = pool_owner(pool)[0]
        by_campaign[campaign_id] = by_campaign.get(campaign_id, 0) + n
    return by_campaign


async def ledger_lag_by_pool(redis: Redis) -> dict[str, int]:
    """Entries in each ledger stream the drainers follow, by its pool (a campaign's id,
    or a sub-pool's)."""
    members = [m.decode() for m in cast(set[bytes], await redis.smembers(CAMPAIGNS_SET))]
    if not members:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for pool in members:
            pipe.xlen(CampaignKeys.of(pool).ledger)
        return dict(zip(members, map(int, await pipe.execute()), strict=True))


async def ledger_lag_by_shard(redis: Redis, by_pool: dict[str, int]) -> dict[str, int]:
    """On a Redis Cluster, the lag of ``by_pool`` (ledger_lag_by_pool) summed by the
    master (host:port) holding each stream; {} on one Redis."""
    cluster = cluster_of(redis)
    if cluster is None:
        return {}
    await cluster.initialize()
    by_shard = {node.name: 0 for node in cluster.get_primaries()}
    for pool, n in by_pool.items():
        node = cluster.get_node_from_key(CampaignKeys.of(pool).ledger)
        if node is not None:
            by_shard[node.name] = by_shard.get(node.name, 0) + n
    return by_shard


async def watch_lag(
    redis: Redis, metrics: Metrics, stop: asyncio.Event, interval_s: float = LAG_SAMPLE_S
) -> None:
    """Keep the ledger-lag gauge current until ``stop`` is set; count the Redis errors met.

    Sampled apart from the drain loop, so the gauge keeps rising while PostgreSQL is down
    and a drainer is stuck retrying one batch.
    """
    while not stop.is_set():
        try:
            by_pool = await ledger_lag_by_pool(redis)
            metrics.set_ledger_lag(sum(by_pool.values()))
            metrics.set_campaign_ledger_lag(by_campaign_of(by_pool))
            by_shard = await ledger_lag_by_shard(redis, by_pool)
            if by_shard:
                metrics.set_shard_ledger_lag(by_shard)
        except RedisError as exc:
            metrics.count_redis_error()
            log.warning("ledger lag not sampled: %s", f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
