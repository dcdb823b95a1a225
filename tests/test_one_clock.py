"""One clock: Redis's decides windows, release slots and the quota day, never a worker's.

Redis runs with its clock set by the test (tests.frozen_redis); the workers' clocks are
injected through the services' ``clock`` parameter, one day fast (or slow). Each check
goes both through the whole request path (ensure_open, which first reads Redis's clock)
and straight to the settlement, as a worker that never read Redis's clock would.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from app.campaigns.service import CampaignService
from app.errors import Ended, NotStarted, QuotaExhausted
from app.identity.sessions import SessionStore
from app.local.haproxy import haproxy_binary
from app.model import iso, now_ms, shanghai_day
from app.store import ledger
from app.store.scripts import CampaignKeys, DrawCode, Scripts, daily_key
from tests.conftest import ADMIN, PAGE
from tests.frozen_redis import FrozenRedis
from tests.test_topology import Topology

HOUR = 3_600_000
DAY = 24 * HOUR
# Noon in Shanghai: Redis's "today" is 2027-02-09; a worker a day fast thinks it is the 10th.
NOON = 1_802_145_600_000  # 2027-02-09T04:00:00Z

LOTTERY: dict[str, Any] = {
    "kind": "lottery",
    "name": "财神到",
    "starts_at": iso(NOON - HOUR),
    "ends_at": iso(NOON + 3 * DAY),
    # One prize now, one released at 20:00 in Shanghai: later today by Redis's clock,
    # already past for a worker a day fast.
    "tiers": [
        {
            "name": "金元宝",
            "stock": 2,
            "weight": 1000,
            "value_fen": 88_800,
            "schedule": [
                {"at": iso(NOON - HOUR), "release": 1},
                {"at": iso(NOON + 8 * HOUR), "release": 1},
            ],
        }
    ],
    "no_prize_weight": 1,
    "quota_total": 10,
    "quota_daily": 1,
}


@pytest.fixture
def frozen(tmp_path: Path) -> Iterator[FrozenRedis]:
    server = FrozenRedis(tmp_path / "redis", NOON)
    yield server
    server.stop()


@pytest.fixture
async def stores(frozen: FrozenRedis, database_url: str, clean: None) -> AsyncIterator[Any]:
    redis = Redis.from_url(frozen.url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    await ledger.migrate(pool)
    yield redis, pool
    await pool.close()
    await redis.aclose()


def worker(stores: Any, skew_ms: int) -> CampaignService:
    """A worker whose clock is Redis's plus ``skew_ms``."""
    redis, pool = stores
    return CampaignService(redis, pool, Scripts(redis), batch_max=64, clock=lambda: NOON + skew_ms)


async def test_a_day_fast_worker_gives_no_prize_of_tomorrow_nor_a_second_daily_draw(
    stores: Any, frozen: FrozenRedis
) -> None:
    redis, _ = stores
    honest = worker(stores, 0)
    cid = (await honest.create(LOTTERY)).id
    fast = worker(stores, DAY)
    # Straight to the settlement: this worker never read Redis's clock.
    campaign = await fast.get(cid)
    first = await asyncio.gather(*(fast.draw(campaign, f"p{i:02d}") for i in range(20)))
    # The whole path: ensure_open first, which reads Redis's clock.
    fast_too = worker(stores, DAY)
    opened = await fast_too.ensure_open(cid)
    first += await asyncio.gather(*(fast_too.draw(opened, f"q{i:02d}") for i in range(20)))
    assert sum(o.result.code is DrawCode.PRIZE for o in first) == 1
    # A second draw today is refused, whatever day the workers believe it is.
    for service, player in ((fast, "p00"), (fast_too, "q00")):
        with pytest.raises(QuotaExhausted) as refused:
            await service.draw(campaign, player)
        assert refused.value.extra["scope"] == "daily"

    keys = CampaignKeys.of(cid)
    today, tomorrow = shanghai_day(NOON), shanghai_day(NOON + DAY)
    assert await redis.hlen(daily_key(cid, today)) == 40
    assert await redis.exists(daily_key(cid, tomorrow)) == 0
    entries = [e for _, e in await redis.xrange(keys.ledger)]
    assert {(e[b"t"], e[b"d"]) for e in entries} == {(str(NOON).encode(), str(today).encode())}
    assert (await honest.stats(cid))["tiers"][0]["released"] == 1

    # When Redis's clock reaches the slot, the second prize is there; the next day, a draw.
    frozen.now = NOON + 8 * HOUR
    late = await asyncio.gather(*(fast.draw(campaign, f"r{i:02d}") for i in range(20)))
    assert sum(o.result.code is DrawCode.PRIZE for o in late) == 1
    frozen.now = NOON + DAY
    assert (await fast.draw(campaign, "p00")).result.draw_no == 2


async def test_a_skewed_worker_grants_nothing_outside_the_window(stores: Any) -> None:
    redis, _ = stores
    honest = worker(stores, 0)
    body = {"kind": "red_packet", "name": "红包", "total_fen": 1_000, "count": 10}
    later = (await honest.create({**body, "starts_at": iso(NOON + HOUR)})).id
    over = (
        await honest.create({**body, "starts_at": iso(NOON - DAY), "ends_at": iso(NOON - HOUR)})
    ).id
    fast, slow = worker(stores, DAY), worker(stores, -DAY)
    for service, cid, refusal in ((fast, later, NotStarted), (slow, over, Ended)):
        # Straight to the script, as a worker trusting its own clock would...
        with pytest.raises(refusal):
            await service.grab(await service.get(cid), "player")
        # ...and through the pre-check, which reads Redis's clock first.
        fresh = worker(stores, DAY if service is fast else -DAY)
        with pytest.raises(refusal):
            await fresh.ensure_open(cid)
        assert await redis.hlen(CampaignKeys.of(cid).winners) == 0
        assert await redis.llen(CampaignKeys.of(cid).pool) == 10
        assert await redis.xlen(CampaignKeys.of(cid).ledger) == 0


@pytest.mark.slow
@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed (.ci/run installs it)")
async def test_workers_a_day_apart_behind_haproxy_agree_with_redis(
    tmp_path: Path, frozen: FrozenRedis, database_url: str, clean: None
) -> None:
    """Two real workers, one a day fast and one a day slow (HB_CLOCK_SKEW_MS), behind HAProxy:
    players see the window, the slots and the quota day of Redis's clock."""
    topo = Topology(tmp_path, frozen.url, database_url)
    redis = Redis.from_url(frozen.url)
    try:
        for name, off in (("fast", DAY), ("slow", -DAY)):
            os.environ["HB_CLOCK_SKEW_MS"] = str(NOON + off - now_ms())
            try:
                topo.start_worker(name)
            finally:
                del os.environ["HB_CLOCK_SKEW_MS"]
        topo.start_edge()
        await asyncio.to_thread(topo.wait_all_up)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), headers=PAGE) as http:

            async def post(path: str, token: str | None = None, body: Any = None) -> Any:
                headers = ADMIN if token is None else {"Cookie": f"hb_session={token}"}
                async with http.post(f"{topo.url}{path}", json=body, headers=headers) as resp:
                    return resp.status, await resp.json()

            status, lottery = await post("/api/admin/campaigns", body=LOTTERY)
            assert status == 201, lottery
            status, packet = await post(
                "/api/admin/campaigns",
                body={
                    "kind": "red_packet",
                    "name": "红包",
                    "total_fen": 1_000,
                    "count": 10,
                    "starts_at": iso(NOON + HOUR),
                },
            )
            assert status == 201, packet
            draw, grab = (
                f"/api/campaigns/{lottery['id']}/draw",
                f"/api/campaigns/{packet['id']}/grab",
            )

            tokens = await SessionStore(redis, 3600).mint([f"p{i:02d}" for i in range(20)])
            firsts = [await post(draw, t) for t in tokens]
            seconds = [await post(draw, t) for t in tokens]
            grabs = [await post(grab, t) for t in tokens]
            assert {s for s, _ in firsts} == {200}
            assert sum(b["result"] == "prize" for _, b in firsts) == 1
            assert {(s, b["error"], b["scope"]) for s, b in seconds} == {
                (429, "quota_exhausted", "daily")
            }
            assert {(s, b["error"]) for s, b in grabs} == {(409, "not_started")}

            # Redis's clock reaches the second slot: one more prize, for new players.
            frozen.now = NOON + 8 * HOUR
            later = await SessionStore(redis, 3600).mint([f"r{i:02d}" for i in range(20)])
            thens = [await post(draw, t) for t in later]
            assert {s for s, _ in thens} == {200}
            assert sum(b["result"] == "prize" for _, b in thens) == 1
        today, tomorrow = shanghai_day(NOON), shanghai_day(NOON + DAY)
        assert await redis.hlen(daily_key(lottery["id"], today)) == 40
        assert await redis.exists(daily_key(lottery["id"], tomorrow)) == 0
        assert await redis.hlen(CampaignKeys.of(packet["id"]).winners) == 0
    finally:
        await redis.aclose()
        await asyncio.to_thread(topo.stop)
