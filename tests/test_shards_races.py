"""Sharded red packets where operators, failures and repairs meet: a sub-pool's id in a
URL, pauses racing resumes, an end while a sub-pool is lost, a lost campaign meta
rebuilt while close-outs are still in the streams."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.campaigns import operations
from app.settings import Settings
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys
from app.web.keys import PG, REDIS
from tests.conftest import ADMIN, create_campaign, login
from tests.test_lifecycle import MANUAL, admin, drain, grab, stats


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The tests drain with drainers of their own, when they choose."""
    return settings.with_(ledger=MANUAL)


async def test_a_sub_pools_id_in_a_url_is_no_campaign(client: TestClient) -> None:
    """The router unquotes %2F into {id}: a sub-pool named so is a 404, as JSON."""
    created = await create_campaign(client, total_fen=1_000, count=10, shards=2)
    campaign = await operations.definition(client.app[PG], str(created["id"]))
    for pool in campaign.spec.pools:
        quoted = pool.replace("/", "%2F")
        for method, path, headers in (
            ("GET", f"/api/campaigns/{quoted}", {}),
            ("GET", f"/api/admin/campaigns/{quoted}", ADMIN),
            ("POST", f"/api/campaigns/{quoted}/grab", {}),
            ("POST", f"/api/admin/campaigns/{quoted}/end", ADMIN),
        ):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 404, (path, await resp.text())
            assert (await resp.json())["error"] == "not_found"
    # Nothing was ended through a sub-pool's name.
    assert (await stats(client, str(created["id"])))["state"] == "open"


async def test_racing_pauses_and_resumes_leave_every_sub_pool_as_the_campaign(
    client: TestClient, redis: Redis
) -> None:
    created = await create_campaign(client, total_fen=10_000, count=100, shards=8)
    cid = str(created["id"])
    pools = (await operations.definition(client.app[PG], cid)).spec.pools
    for _ in range(20):
        answers = await asyncio.gather(
            admin(client, cid, "pause"), admin(client, cid, "resume"), admin(client, cid, "pause")
        )
        assert [status for status, _ in answers] == [200, 200, 200]
        own = await redis.hget(CampaignKeys.of(cid).meta, "paused")
        subs = [await redis.hget(CampaignKeys.of(p).meta, "paused") for p in pools]
        assert subs == [own] * len(pools), (own, subs)


async def test_an_end_while_a_sub_pool_is_lost_reaches_it_once_rebuilt(
    client: TestClient, redis: Redis
) -> None:
    """The end closes the live sub-pools; the rebuilt one reopens ended, and the drainers
    close it out: won + refunded == the budget, one close-out per shard."""
    created = await create_campaign(client, total_fen=1_000, count=10, shards=2)
    cid = str(created["id"])
    pools = (await operations.definition(client.app[PG], cid)).spec.pools
    token = await login(client, "alice")
    client.session.cookie_jar.clear()
    assert (await grab(client, token, cid))[0] == 200
    await drain(client)
    keys = CampaignKeys.of(pools[1])
    await redis.delete(keys.meta, keys.pool, keys.winners)
    assert (await admin(client, cid, "end"))[0] == 200
    await drain(client)
    await operations.rebuild(client.app[REDIS], client.app[PG], cid)
    await drain(client)
    await drain(client)  # the drainers close the rebuilt sub-pool out, then record it
    after = await stats(client, cid)
    assert after["state"] == "ended"
    assert after["won_count"] + after["refunded_count"] == 10
    assert after["won_fen"] + after["refunded_fen"] == 1_000
    for shard in after["per_shard"]:
        assert shard["remaining_count"] == shard["refunded_count"]
    rows = await client.app[PG].fetch(
        "SELECT shard, refunded_count FROM closeouts WHERE campaign_id = $1 ORDER BY shard", cid
    )
    assert [r["shard"] for r in rows] == [0, 1]
    assert sum(r["refunded_count"] for r in rows) == 9
    report = await operations.reconcile(client.app[REDIS], client.app[PG], cid)
    assert report.ok, report.render()
    resp = await client.get(f"/api/campaigns/{cid}/results")
    assert resp.status == 200, await resp.text()
    assert not {p.encode() for p in pools} & await redis.smembers(CAMPAIGNS_SET)


async def test_a_lost_campaign_meta_rebuilt_before_the_close_outs_are_drained_stays_ended(
    client: TestClient, redis: Redis
) -> None:
    created = await create_campaign(client, total_fen=1_000, count=10, shards=2)
    cid = str(created["id"])
    ended = await admin(client, cid, "end")
    assert ended[0] == 200
    # The close-outs are still in the sub-pools' streams; the campaign's meta is lost.
    await redis.delete(CampaignKeys.of(cid).meta)
    await operations.rebuild(client.app[REDIS], client.app[PG], cid)
    await drain(client)
    await drain(client)
    after = await stats(client, cid)
    assert after["state"] == "ended"
    assert after["refunded_count"] == 10
    assert cid.encode() not in await redis.smembers(CAMPAIGNS_SET)
    report = await operations.reconcile(client.app[REDIS], client.app[PG], cid)
    assert report.ok, report.render()
