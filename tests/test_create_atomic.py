"""Creation is all or nothing: a create that fails in either store leaves nothing behind.

Each half is failed for real: PostgreSQL unreachable, or refusing the envelopes once the
Redis half has loaded them (a trigger); Redis refusing writes (``maxmemory 1`` with
``noeviction`` on a private server). Afterwards neither store holds anything of the
campaign, and the admin who asked got a JSON error, not a half-made campaign.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.campaigns.service import CampaignService
from app.local.embedded import EmbeddedRedis, free_port
from app.model import Campaign, Kind
from app.records import Envelope
from app.redpacket import pool as redpacket_pool
from app.redpacket.spec import RedPacketSpec
from app.reports import Phase
from app.settings import Settings
from app.store import ledger
from app.store.scripts import Scripts
from app.web.factory import create_app
from tests.conftest import ADMIN, PAGE

RED_PACKET = {"kind": "red_packet", "name": "红包", "total_fen": 5_000_000, "count": 50_000}
LOTTERY = {
    "kind": "lottery",
    "name": "财神到",
    "tiers": [{"name": "福", "stock": 10, "weight": 1, "value_fen": 100}],
}
# Refuses envelopes half a second into the insert: by then the Redis half has loaded.
REFUSE_ENVELOPES = """
CREATE FUNCTION refuse_envelopes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.5);
    RAISE EXCEPTION 'envelopes refused by the test';
END $$;
CREATE TRIGGER refuse BEFORE INSERT ON envelopes
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_envelopes();
"""


@pytest.fixture
async def private(private_redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def pg_pool(database_url: str, clean: None) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    await ledger.migrate(pool)
    yield pool
    await pool.close()


async def nothing_left(redis: Redis, pg: asyncpg.Pool) -> None:
    """Neither store holds any campaign."""
    assert await redis.keys("hb:*") == []
    assert await pg.fetchval("SELECT count(*) FROM campaigns") == 0
    assert await pg.fetchval("SELECT count(*) FROM envelopes") == 0


@pytest.mark.parametrize("body", [RED_PACKET, LOTTERY], ids=["red_packet", "lottery"])
async def test_postgres_unreachable(private: Redis, pg_pool: asyncpg.Pool, body: Any) -> None:
    dead = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0)
    service = CampaignService(private, dead, Scripts(private), batch_max=16)
    with pytest.raises(ConnectionRefusedError):
        await service.create(body)
    await dead.close()
    await nothing_left(private, pg_pool)


async def test_postgres_refuses_after_redis_loaded(private: Redis, pg_pool: asyncpg.Pool) -> None:
    async with pg_pool.acquire() as conn:
        await conn.execute(REFUSE_ENVELOPES)
    loads: list[int] = []

    def progress(phase: Phase, done: int, total: int) -> None:
        if phase is Phase.REDIS:
            loads.append(done)

    service = CampaignService(private, pg_pool, Scripts(private), batch_max=16)
    with pytest.raises(asyncpg.RaiseError, match="refused by the test"):
        await service.create(RED_PACKET, progress=progress)
    # The Redis half had loaded every envelope before PostgreSQL refused them.
    assert loads[-1] == RED_PACKET["count"]
    await nothing_left(private, pg_pool)


@pytest.mark.parametrize("body", [RED_PACKET, LOTTERY], ids=["red_packet", "lottery"])
async def test_redis_refuses_writes(
    aiohttp_client: Any,
    settings: Settings,
    private_redis_server: EmbeddedRedis,
    private: Redis,
    pg_pool: asyncpg.Pool,
    body: Any,
) -> None:
    client: TestClient = await aiohttp_client(
        create_app(settings.with_(redis_url=private_redis_server.url)), headers=PAGE
    )
    await private.config_set("maxmemory-policy", "noeviction")
    await private.config_set("maxmemory", "1")
    try:
        resp = await client.post("/api/admin/campaigns", json=body, headers=ADMIN)
        answer = await resp.json()
    finally:
        await private.config_set("maxmemory", "0")
    assert resp.status == 503, answer
    assert set(answer) == {"error", "message"}
    # What the app itself keeps in Redis (the session signing key) is not a campaign's.
    assert [k for k in await private.keys("hb:*") if k.startswith(b"hb:{")] == []
    assert await private.scard("hb:campaigns") == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM campaigns") == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM envelopes") == 0


async def test_a_pool_loaded_but_never_opened_expires(private: Redis) -> None:
    campaign = Campaign("left", Kind.RED_PACKET, "t", None, None, RedPacketSpec(3, 3, 1, None))
    envelopes = [Envelope(i, 1) for i in range(3)]
    await redpacket_pool.load(private, campaign, envelopes, {"u": Envelope(9, 1)})
    pool_key, winners_key = "hb:{left}:pool", "hb:{left}:winners"
    assert 0 < await private.ttl(pool_key) <= redpacket_pool.LOAD_TTL_S
    assert 0 < await private.ttl(winners_key) <= redpacket_pool.LOAD_TTL_S
    await redpacket_pool.open_campaign(private, campaign)
    assert await private.ttl(pool_key) == -1
    assert await private.ttl(winners_key) == -1
