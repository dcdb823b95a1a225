"""The results through HAProxy in front of two worker processes (fixtures of
tests/test_topology.py): every player is told the same final answer, cacheable, and each
worker reads it from PostgreSQL once, however many ask."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from redis.asyncio import Redis

from app.store.scripts import CampaignKeys
from tests.test_ledger import wait_drained
from tests.test_topology import Topology, create_campaign, http, topology

__all__ = ["http", "topology"]  # fixtures, imported for this module's tests

PLAYERS = 60
ASKS = 600


async def _login(http: aiohttp.ClientSession, url: str, openid: str) -> str:
    async with http.post(f"{url}/auth/dev-login", json={"openid": openid}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.cookies["hb_session"].value


async def test_final_results_through_haproxy_once_per_worker(
    topology: Topology, http: aiohttp.ClientSession, redis: Redis
) -> None:
    url = topology.url
    cid = await create_campaign(http, url, total=6_666, count=50)
    tokens = [await _login(http, url, f"edge{i:03d}") for i in range(PLAYERS)]
    told: dict[str, int] = {}
    for i, token in enumerate(tokens):
        async with http.post(
            f"{url}/api/campaigns/{cid}/grab", cookies={"hb_session": token}
        ) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            if body["result"] == "won":
                told[f"edge{i:03d}"] = body["amount_fen"]
    assert (len(told), sum(told.values())) == (50, 6_666)
    await wait_drained(redis, cid)
    assert await redis.llen(CampaignKeys.of(cid).pool) == 0

    async def ask() -> tuple[int, str, bytes]:
        async with http.get(f"{url}/api/campaigns/{cid}/results") as resp:
            return resp.status, resp.headers.get("Cache-Control", ""), await resp.read()

    answers = await asyncio.gather(*(ask() for _ in range(ASKS)))
    assert {(status, cache) for status, cache, _ in answers} == {(200, "public, max-age=3600")}
    bodies = {body for _, _, body in answers}
    assert len(bodies) == 1
    final = orjson.loads(bodies.pop())
    assert (final["won_count"], final["won_fen"]) == (50, 6_666)
    assert final["best"]["amount_fen"] == max(told.values())
    assert len(final["winners"]) == 20

    # Both workers answered, and each read the final results from PostgreSQL once.
    await asyncio.sleep(1.5)  # the access logs are flushed within a second
    for name in ("w1", "w2"):
        log = (topology.tmp / f"{name}.log").read_text()
        served = sum(
            '"route":"/api/campaigns/{id}/results"' in line and '"status":200' in line
            for line in log.splitlines()
        )
        assert served > 0, name
        assert log.count(f"results of {cid} are final") == 1, name
