"""Pause, resume, end and the close-out on a real Redis Cluster (3 masters, 3 replicas).

The lifecycle scripts touch only the campaign's own keys (one slot); the list the drainers
follow is written apart; two workers agree through the events channel as on one Redis.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.campaigns import operations
from app.settings import Settings
from app.store.scripts import CampaignKeys
from tests.cluster_support import (  # noqa: F401 - fixtures
    cluster_app,
    cluster_clean_fixture,
    cluster_fixture,
    cluster_redis_fixture,
    cluster_settings_fixture,
)
from tests.conftest import ADMIN, create_campaign, gather_limited, login, until_live
from tests.test_lottery_api import LOTTERY


async def _post(client: TestClient, path: str, token: str | None = None) -> tuple[int, Any]:
    kwargs: dict[str, Any] = (
        {"headers": ADMIN} if token is None else {"cookies": {"hb_session": token}}
    )
    resp = await client.post(path, **kwargs)
    return resp.status, await resp.json()


async def _until(check: Any, what: str, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_pause_end_and_close_out_on_the_cluster(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis, database_url: str
) -> None:
    a = await cluster_app(aiohttp_client, cluster_settings)
    b = await cluster_app(aiohttp_client, cluster_settings)
    packets = [str((await create_campaign(a, total_fen=10_000, count=100))["id"]) for _ in range(3)]
    lottery = LOTTERY | {"quota_total": 100, "quota_daily": None}
    resp = await a.post("/api/admin/campaigns", json=lottery, headers=ADMIN)
    lid = (await resp.json())["id"]
    tokens = await gather_limited([login(a, f"c{i:03d}") for i in range(60)])
    a.session.cookie_jar.clear()
    await until_live(a, b, within_s=10)

    for cid in packets:
        assert (await _post(a, f"/api/admin/campaigns/{cid}/pause"))[1]["state"] == "paused"
        for worker in (a, b):
            status, body = await _post(worker, f"/api/campaigns/{cid}/grab", tokens[0])
            assert (status, body["error"]) == (409, "paused")
        assert (await _post(b, f"/api/admin/campaigns/{cid}/resume"))[1]["state"] == "open"
    status, body = await _post(a, f"/api/admin/campaigns/{lid}/pause")
    assert (status, body["state"]) == (200, "paused")
    assert (await _post(b, f"/api/campaigns/{lid}/draw", tokens[0]))[1]["error"] == "paused"
    await _post(a, f"/api/admin/campaigns/{lid}/resume")

    async def grab_all(cid: str) -> None:
        for worker in (a, b):

            async def takes(worker: TestClient = worker) -> bool:
                return (await _post(worker, f"/api/campaigns/{cid}/grab", tokens[1]))[0] == 200

            await _until(takes, "a worker kept refusing after the resume", within_s=5)
        await gather_limited([_post(a, f"/api/campaigns/{cid}/grab", t) for t in tokens[2:30]])

    await asyncio.gather(*(grab_all(cid) for cid in packets))
    for t in tokens[:10]:
        assert (await _post(b, f"/api/campaigns/{lid}/draw", t))[0] == 200

    ended = {}
    for cid in [*packets, lid]:
        status, ended[cid] = await _post(b if cid == lid else a, f"/api/admin/campaigns/{cid}/end")
        assert (status, ended[cid]["state"]) == (200, "ended")
    for cid in packets:
        assert ended[cid]["won_count"] == 29
        assert ended[cid]["won_fen"] + ended[cid]["refunded_fen"] == 10_000

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        for cid in [*packets, lid]:

            async def drained(cid: str = cid) -> bool:
                return await cluster_redis.xlen(CampaignKeys.of(cid).ledger) == 0

            await _until(drained, f"{cid} did not drain")
            rows = await pool.fetch(
                "SELECT refunded_fen FROM closeouts WHERE campaign_id = $1", cid
            )
            assert len(rows) == 1
            report = await operations.reconcile(cluster_redis, pool, cid)
            assert report.ok, report.render()
        paused = await pool.fetchval("SELECT count(*) FROM campaigns WHERE paused")
        assert paused == 0  # every pause was resumed, in stream order
    finally:
        await pool.close()
