"""Idempotent draws through the real HAProxy and two worker processes.

A player's draw is sent and the connection dropped before the reply is read: the draw is
made, the player never hears of it. The retry under the same Idempotency-Key answers
that very draw (same number, same prize) instead of drawing again; retries racing on both
workers draw once; Redis and PostgreSQL each hold one draw per key.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from app.identity.sessions import SessionStore
from app.local.haproxy import haproxy_binary
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN
from tests.test_topology import Topology, http, topology

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        haproxy_binary() is None, reason="haproxy not installed (.ci/run installs it)"
    ),
]
__all__ = ["http", "topology"]  # fixtures, imported for this module's tests

LOTTERY = {
    "kind": "lottery",
    "name": "财神到",
    "tiers": [
        {"name": "金元宝", "stock": 1000, "weight": 1, "value_fen": 88_800},
        {"name": "福袋", "stock": 1000, "weight": 1, "value_fen": 800},
    ],
    "no_prize_weight": 1,
    "quota_total": 10,
}


def send_and_hang_up(port: int, path: str, token: str, key: str) -> None:
    """Send a draw request to HAProxy and close the connection without reading a byte."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Cookie: hb_session={token}\r\nX-Requested-With: hongbao\r\n"
        f"Idempotency-Key: {key}\r\nContent-Length: 0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())


async def draw(
    http: aiohttp.ClientSession, url: str, token: str, key: str | None
) -> tuple[int, dict[str, Any]]:
    headers = {"Cookie": f"hb_session={token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with http.post(url, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def draws_in_redis(redis: Redis, cid: str, openid: str) -> int:
    return int(await redis.hget(CampaignKeys.of(cid).draws, openid) or 0)


async def test_a_retry_after_a_lost_reply_gets_the_same_draw(
    topology: Topology, http: aiohttp.ClientSession, redis_url: str, database_url: str
) -> None:
    async with http.post(f"{topology.url}/api/admin/campaigns", json=LOTTERY, headers=ADMIN) as r:
        assert r.status == 201, await r.text()
        cid = str((await r.json())["id"])
    redis = Redis.from_url(redis_url)
    try:
        ann, bob = await SessionStore(redis, 3600).mint(["ann", "bob"])
        path = f"/api/campaigns/{cid}/draw"
        url = f"{topology.url}{path}"
        assert topology.edge is not None

        # The reply is lost: the draw is made all the same (bounded wait for it).
        await asyncio.to_thread(send_and_hang_up, topology.edge.public_port, path, ann, "tap-1")
        deadline = time.monotonic() + 10
        while await draws_in_redis(redis, cid, "ann") == 0:
            assert time.monotonic() < deadline, "the draw whose reply was lost never happened"
            await asyncio.sleep(0.02)
        retries = [await draw(http, url, ann, "tap-1") for _ in range(2)]
        assert [status for status, _ in retries] == [200, 200]
        assert retries[0][1] == retries[1][1]
        assert retries[0][1]["draw_no"] == 1
        assert await draws_in_redis(redis, cid, "ann") == 1
        # A new tap is a new draw; a malformed key is refused before anything is drawn.
        status, fresh = await draw(http, url, ann, "tap-2")
        assert (status, fresh["draw_no"]) == (200, 2)
        status, bad = await draw(http, url, ann, "no spaces {here}")
        assert (status, bad["error"], bad["field"]) == (422, "invalid", "Idempotency-Key")
        assert await draws_in_redis(redis, cid, "ann") == 2

        # Retries racing through both workers: one draw, every answer the same.
        raced = await asyncio.gather(*(draw(http, url, bob, "tap-1") for _ in range(8)))
        assert {s for s, _ in raced} == {200}
        assert len({orjson.dumps(body) for _, body in raced}) == 1
        assert await draws_in_redis(redis, cid, "bob") == 1

        stream = CampaignKeys.of(cid).ledger
        deadline = time.monotonic() + 30
        while await redis.xlen(stream):
            assert time.monotonic() < deadline, "the ledger stream did not drain"
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT openid, draw_no, tier FROM draws WHERE campaign_id = $1 ORDER BY 1, 2", cid
        )
    finally:
        await conn.close()
    assert [(r["openid"], r["draw_no"]) for r in rows] == [("ann", 1), ("ann", 2), ("bob", 1)]
    # What the retry told ann is what was drawn and recorded the first time.
    first = rows[0]["tier"]
    told = retries[0][1]
    if first is None:
        assert told["result"] == "no_prize"
    else:
        assert (told["result"], told["prize"]["name"]) == ("prize", LOTTERY["tiers"][first]["name"])
