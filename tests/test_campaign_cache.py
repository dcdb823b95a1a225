"""A cold worker reads a campaign's definition once, however many requests wait for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from app.campaigns.service import CampaignService
from app.errors import NotFound
from app.local.embedded import EmbeddedRedis
from app.model import Campaign, Kind
from app.redpacket.spec import RedPacketSpec, to_meta
from app.store.scripts import CampaignKeys, Scripts
from tests.conftest import command_calls


@pytest.fixture
async def private_redis(private_redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    """A client of this test's own Redis, so its command counters see nobody else."""
    client = Redis.from_url(private_redis_server.url)
    yield client
    await client.aclose()


async def _hgetall_calls(redis: Redis) -> int:
    return await command_calls(redis, "hgetall")


async def test_cold_burst_reads_definition_once(
    private_redis: Redis, database_url: str, clean: None
) -> None:
    campaign = Campaign(
        "c0ld", Kind.RED_PACKET, "冷启动", None, None, RedPacketSpec(100, 1, 1, None)
    )
    await private_redis.hset(CampaignKeys.of("c0ld").meta, mapping=to_meta(campaign))
    pg = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        service = CampaignService(private_redis, pg, Scripts(private_redis), batch_max=16)
        before = await _hgetall_calls(private_redis)
        got = await asyncio.gather(*(service.get("c0ld") for _ in range(500)))
        assert {c.name for c in got} == {"冷启动"}
        assert await _hgetall_calls(private_redis) - before == 1

        # An unknown id fails every waiter with 404, and is not cached as a miss.
        results = await asyncio.gather(
            *(service.get("nope") for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, NotFound) for r in results)
        assert await _hgetall_calls(private_redis) - before == 2
        with pytest.raises(NotFound):
            await service.get("nope")
        assert await _hgetall_calls(private_redis) - before == 3
    finally:
        await pg.close()
