"""Two drainers on the same entries while PostgreSQL stalls: the right rows, no reject.

A transaction of the test holds a row lock that the ledger insert must wait for (the
envelopes a grab references, the campaign a draw references), longer than the claim idle
time. The first drainer is stuck in its INSERT; the second claims the same entries and
writes them too, waiting on the first one's open transaction. Once the lock goes, both
finish: PostgreSQL must hold exactly what Redis granted, with no false contradiction in
ledger_rejects, and reconcile must find nothing wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from app.background.drainer import GROUP, Drainer
from app.campaigns import operations
from app.campaigns.service import CampaignService
from app.settings import LedgerSettings
from app.store import ledger
from app.store.scripts import CampaignKeys, Scripts

CLAIM_IDLE_MS = 300
SETTINGS = LedgerSettings(block_ms=50, claim_idle_ms=CLAIM_IDLE_MS, retry_max_ms=200, linger_ms=0)
PLAYERS = 40

# Sessions of this database waiting for a lock, other than the asking one.
BLOCKED = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
"""
# What the stall locks: the rows the insert's foreign-key check must share-lock.
STALL = {
    "red_packet": "SELECT 1 FROM envelopes WHERE campaign_id = $1 FOR UPDATE",
    "lottery": "SELECT 1 FROM campaigns WHERE id = $1 FOR UPDATE",
}
DEFINITIONS: dict[str, dict[str, Any]] = {
    "red_packet": {"kind": "red_packet", "name": "红包", "total_fen": 10_000, "count": PLAYERS},
    "lottery": {
        "kind": "lottery",
        "name": "财神到",
        "tiers": [{"name": "福", "stock": 10, "weight": 1, "value_fen": 100}],
        "no_prize_weight": 1,
    },
}


@pytest.fixture
async def pools(database_url: str, clean: None) -> AsyncIterator[list[asyncpg.Pool]]:
    """Three pools: the service's and one for each drainer."""
    made = [await asyncpg.create_pool(database_url, min_size=1, max_size=2) for _ in range(3)]
    await ledger.migrate(made[0])
    yield made
    for pool in made:
        await pool.close()


async def until(check: Any, what: str, within_s: float = 20) -> None:
    """Wait (bounded) until ``await check()`` is true."""
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["red_packet", "lottery"])
async def test_second_drainer_on_stalled_entries_records_no_contradiction(
    redis: Redis, pools: list[asyncpg.Pool], database_url: str, kind: str
) -> None:
    service_pg, first_pg, second_pg = pools
    service = CampaignService(redis, service_pg, Scripts(redis), batch_max=64)
    cid = (await service.create(DEFINITIONS[kind])).id
    campaign = await service.ensure_open(cid)
    players = [f"p{i:03d}" for i in range(PLAYERS)]
    if kind == "red_packet":
        await asyncio.gather(*(service.grab(campaign, p) for p in players))
    else:
        await asyncio.gather(*(service.draw(campaign, p) for p in players))
    stream = CampaignKeys.of(cid).ledger
    assert await redis.xlen(stream) == PLAYERS

    stall = await asyncpg.connect(database_url)
    tx = stall.transaction()
    await tx.start()
    await stall.execute(STALL[kind], cid)
    first = Drainer(redis, first_pg, SETTINGS, "first")
    second = Drainer(redis, second_pg, SETTINGS, "second")
    tasks = [asyncio.create_task(first.run())]
    try:
        await until(lambda: stall.fetchval(BLOCKED), "the first drainer never reached the lock")
        # Idle past the claim time: the second drainer takes the entries the first holds.
        await asyncio.sleep(2 * CLAIM_IDLE_MS / 1000)
        tasks.append(asyncio.create_task(second.run()))

        async def claimed() -> bool:
            pending = await redis.xpending(stream, GROUP)
            owners = {c["name"]: c["pending"] for c in pending["consumers"]}
            return owners.get(b"second", 0) == PLAYERS and await stall.fetchval(BLOCKED) >= 2

        await until(claimed, "the second drainer did not claim and wait on the first's rows")
        await tx.rollback()
        await until(lambda: _empty(redis, stream), "the ledger stream did not drain")
    finally:
        first.stop()
        second.stop()
        await asyncio.gather(*tasks)
        await stall.close()

    assert (first.written + second.written).inserted == PLAYERS
    assert (first.written + second.written).rejected == 0
    assert await ledger.fetch_rejects(service_pg, cid) == []
    if kind == "red_packet":
        recorded = await ledger.fetch_grabs(service_pg, cid)
        raw = await redis.hgetall(CampaignKeys.of(cid).winners)
        assert {u: e.encode().encode() for u, e in recorded.items()} == {
            u.decode(): v for u, v in raw.items()
        }
    else:
        recorded_draws = await ledger.fetch_draws(service_pg, cid)
        assert sorted(recorded_draws) == sorted((p, 1) for p in players)
    report = await operations.reconcile(redis, service_pg, cid)
    assert report.ok, report.mismatches


async def _empty(redis: Redis, stream: str) -> bool:
    return int(await redis.xlen(stream)) == 0
