"""Pause, resume and end as players meet them: HAProxy in front of two real workers.

The pause is decided by Redis (the script refuses on every worker from the call on); the
events channel then lets each worker answer "paused" from memory, without a script call;
the end closes the campaign out once, and the workers' own drainers record it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from app.identity.sessions import SessionStore
from app.local.embedded import EmbeddedRedis
from app.local.haproxy import haproxy_binary
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN, PAGE, command_calls
from tests.test_topology import Topology

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        haproxy_binary() is None, reason="haproxy not installed (.ci/run installs it)"
    ),
]


@pytest.fixture
async def stack(
    tmp_path: Path, private_redis_server: EmbeddedRedis, database_url: str, clean: None
) -> AsyncIterator[tuple[Topology, Redis]]:
    """Two workers behind HAProxy on a Redis of the test's own (its counters are ours)."""
    topo = Topology(tmp_path, private_redis_server.url, database_url)
    redis = Redis.from_url(private_redis_server.url)
    try:
        topo.start_worker("w1")
        topo.start_worker("w2")
        topo.start_edge()
        await asyncio.to_thread(topo.wait_all_up)
        yield topo, redis
    finally:
        await redis.aclose()
        await asyncio.to_thread(topo.stop)


async def until(check: Callable[[], Awaitable[bool]], what: str, within_s: float = 5) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_every_worker_refuses_at_once_then_from_memory(
    stack: tuple[Topology, Redis], database_url: str
) -> None:
    topo, redis = stack
    workers = [f"http://127.0.0.1:{port}" for port in topo.worker_ports.values()]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), headers=PAGE) as http:

        async def call(
            method: str, url: str, token: str | None = None, body: Any = None
        ) -> tuple[int, Any]:
            headers = ADMIN if token is None else {"Cookie": f"hb_session={token}"}
            async with http.request(method, url, headers=headers, json=body) as resp:
                return resp.status, await resp.json()

        definition = {"kind": "red_packet", "name": "暂停", "total_fen": 10_000, "count": 100}
        status, created = await call("POST", f"{topo.url}/api/admin/campaigns", body=definition)
        assert status == 201, created
        cid = created["id"]
        grab, view = f"/api/campaigns/{cid}/grab", f"/api/campaigns/{cid}"
        admin = f"{topo.url}/api/admin/campaigns/{cid}"
        tokens = await SessionStore(redis, 3600).mint([f"t{i:03d}" for i in range(80)])
        first = [
            await call("POST", f"{w}{grab}", t) for w, t in zip(workers, tokens[:2], strict=True)
        ]
        assert [b["result"] for _, b in first] == ["won", "won"]

        status, paused = await call("POST", f"{admin}/pause")
        assert (status, paused["state"]) == (200, "paused")
        # At once, on both workers, whatever their memory holds yet: the script refuses.
        at_once = [await call("POST", f"{w}{grab}", tokens[2 + i]) for i, w in enumerate(workers)]
        assert {(s, b["error"]) for s, b in at_once} == {(409, "paused")}
        for w in workers:

            async def shows_paused(w: str = w) -> bool:
                return (await call("GET", f"{w}{view}"))[1]["state"] == "paused"

            await until(shows_paused, f"{w} never showed the pause")
        # Known now: refused from memory, no script call, on either worker.
        scripts = await command_calls(redis, "evalsha", "eval")
        refused = await asyncio.gather(
            *(call("POST", f"{workers[i % 2]}{grab}", t) for i, t in enumerate(tokens[10:50]))
        )
        assert {(s, b["error"]) for s, b in refused} == {(409, "paused")}
        assert await command_calls(redis, "evalsha", "eval") == scripts
        assert await redis.hlen(CampaignKeys.of(cid).winners) == 2

        status, resumed = await call("POST", f"{admin}/resume")
        assert (status, resumed["state"]) == (200, "open")
        for i, w in enumerate(workers):

            async def grabs_again(w: str = w, token: str = tokens[50 + i]) -> bool:
                return (await call("POST", f"{w}{grab}", token))[0] == 200

            await until(grabs_again, f"{w} never took grabs again")

        status, ended = await call("POST", f"{admin}/end")
        assert (status, ended["state"]) == (200, "ended")
        assert ended["won_count"] == 4
        assert ended["won_fen"] + ended["refunded_fen"] == 10_000
        assert ended["refunded_count"] == 96
        assert (await call("POST", f"{admin}/pause"))[1]["error"] == "ended"
        for i, w in enumerate(workers):
            status, answer = await call("POST", f"{w}{grab}", tokens[60 + i])
            assert (status, answer["error"]) == (409, "ended")
            assert (await call("GET", f"{w}{view}"))[1]["state"] == "ended"

    # The workers' drainers record the close-out once.
    conn = await asyncpg.connect(database_url)
    try:

        async def recorded() -> bool:
            rows = await conn.fetch(
                "SELECT refunded_fen FROM closeouts WHERE campaign_id = $1", cid
            )
            return [r["refunded_fen"] for r in rows] == [ended["refunded_fen"]]

        await until(recorded, "the close-out never reached PostgreSQL", within_s=15)
        granted = await conn.fetchval(
            "SELECT sum(amount_fen) FROM grabs WHERE campaign_id = $1", cid
        )
        assert granted == ended["won_fen"]
    finally:
        await conn.close()
