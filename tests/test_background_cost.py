"""Background work follows live campaigns, not history.

A private Redis (its command counters see nobody else) holds one live campaign and a
thousand old ones: ended, closed out, their streams drained. After a drainer's first refresh lets go
of the old ones, its steps and the lag sampler send as many commands as with the live
campaign alone; PostgreSQL still knows the old campaigns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from app.background.drainer import GROUP, REFRESH_S, Drainer
from app.background.lag import ledger_lag
from app.local.embedded import EmbeddedRedis
from app.model import Campaign, Kind
from app.records import Envelope
from app.redpacket import pool
from app.redpacket.spec import RedPacketSpec
from app.settings import LedgerSettings
from app.store import ledger
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys

OLD = 1_000
# Claim passes every claim_idle_ms / 2 and a refresh every REFRESH_S both fall inside
# the measured window.
SETTINGS = LedgerSettings(block_ms=20, claim_idle_ms=400, linger_ms=0)


@pytest.fixture
async def private(private_redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def pg_pool(database_url: str, clean: None) -> AsyncIterator[asyncpg.Pool]:
    made = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    await ledger.migrate(made)
    yield made
    await made.close()


async def commands(redis: Redis) -> int:
    """Commands the server has run so far, all clients, INFO itself left out."""
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def open_campaign(redis: Redis, cid: str, ends_at_ms: int | None) -> None:
    campaign = Campaign(cid, Kind.RED_PACKET, cid, None, ends_at_ms, RedPacketSpec(1, 1, 1, None))
    await pool.open_campaign(redis, campaign)


async def per_step(drainer: Drainer, redis: Redis) -> float:
    """Commands per drainer step, over a window holding claim passes and a refresh."""
    before, steps = await commands(redis), 0
    deadline = time.monotonic() + REFRESH_S * 1.5
    while time.monotonic() < deadline:
        await drainer.step()
        steps += 1
    return (await commands(redis) - before) / steps


async def test_drainer_and_sampler_cost_does_not_grow_with_old_campaigns(
    private: Redis, pg_pool: asyncpg.Pool
) -> None:
    await open_campaign(private, "live", None)
    drainer = Drainer(private, pg_pool, SETTINGS, "alone")
    await drainer.step()
    alone = await per_step(drainer, private)
    before = await commands(private)
    await ledger_lag(private)
    lag_alone = await commands(private) - before

    # A thousand campaigns that ended an hour ago, drained as a drainer leaves them: the
    # consumer group made, closed out, every entry recorded and deleted.
    ended = int(time.time() * 1000) - 3_600_000
    old = [f"old{i:04d}" for i in range(OLD)]
    async with private.pipeline(transaction=False) as pipe:
        for cid in old:
            pipe.xgroup_create(CampaignKeys.of(cid).ledger, GROUP, id="0", mkstream=True)
        await pipe.execute()
    for cid in old:
        await open_campaign(private, cid, ended)
        await private.hset(CampaignKeys.of(cid).meta, "closed_ms", ended)
    assert await private.scard(CAMPAIGNS_SET) == OLD + 1

    with_history = Drainer(private, pg_pool, SETTINGS, "with-history")
    await with_history.step()  # the first refresh lets go of the old campaigns
    assert await private.smembers(CAMPAIGNS_SET) == {b"live"}
    crowded = await per_step(with_history, private)
    before = await commands(private)
    assert await ledger_lag(private) == 0
    lag_crowded = await commands(private) - before

    # Every step reads the live stream once; refreshes and claim passes add a few
    # commands each, whatever the history: about 1.6 per step either way here, against
    # about 1,500 when the old campaigns are still followed. The margin absorbs timing.
    assert crowded <= 2 * alone, (alone, crowded)
    assert lag_crowded == lag_alone
    # The old campaigns' streams are left as they were.
    assert await private.exists(CampaignKeys.of(old[0]).ledger) == 1


async def test_an_ended_campaign_is_followed_until_its_stream_is_drained(
    private: Redis, pg_pool: asyncpg.Pool
) -> None:
    ended = int(time.time() * 1000) - 1_000
    campaign = Campaign("late", Kind.RED_PACKET, "late", None, ended, RedPacketSpec(1, 1, 1, None))
    await ledger.insert_campaign(pg_pool, campaign, amounts=[1])
    await pool.open_campaign(private, campaign)
    # One grant still in flight: settled before the end, not yet recorded.
    await private.xadd(
        CampaignKeys.of("late").ledger, {"u": "p", "s": "0", "a": "1", "t": str(ended - 1)}
    )
    drainer = Drainer(private, pg_pool, SETTINGS, "late")
    # Its refresh closes it out: the grant and the close-out are drained together.
    assert await drainer.step() == 2
    assert await private.smembers(CAMPAIGNS_SET) == {b"late"}
    assert await ledger.fetch_grabs(pg_pool, "late") == {"p": Envelope(0, 1)}
    assert await ledger.fetch_closeout(pg_pool, "late") is not None
    # Drained now: the next refresh lets go of it.
    await asyncio.sleep(REFRESH_S)
    await drainer.step()
    assert await private.scard(CAMPAIGNS_SET) == 0
