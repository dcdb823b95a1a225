"""Pause, resume, end and sell-out as players meet them: HAProxy in front of two real
workers.

The pause is decided by Redis (the script refuses on every worker from the call on); the
events channel then lets each worker answer "paused" from memory, without a script call;
the end closes the campaign out once, and the workers' own drainers record it. Once
sold out, grabs are answered from memory with no Redis command at all, while a player
who logged out is refused on every worker and a winner is told what it won.
"""

from __future__ import annotations

import asyncio
import functools
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
from tests.conftest import ADMIN, GRAB_COMMANDS, PAGE, command_calls
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


async def _call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    """One request as the admin (no token) or as the player of ``token``."""
    headers = ADMIN if token is None else {"Cookie": f"hb_session={token}"}
    async with http.request(method, url, headers=headers, json=body) as resp:
        return resp.status, await resp.json()


async def test_every_worker_refuses_at_once_then_from_memory(
    stack: tuple[Topology, Redis], database_url: str
) -> None:
    topo, redis = stack
    workers = [f"http://127.0.0.1:{port}" for port in topo.worker_ports.values()]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), headers=PAGE) as http:
        call = functools.partial(_call, http)
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


async def test_sold_out_from_memory_through_the_edge_keeps_every_check(
    stack: tuple[Topology, Redis],
) -> None:
    topo, redis = stack
    workers = [f"http://127.0.0.1:{port}" for port in topo.worker_ports.values()]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), headers=PAGE) as http:
        call = functools.partial(_call, http)
        definition = {"kind": "red_packet", "name": "抢光", "total_fen": 300, "count": 3}
        status, created = await call("POST", f"{topo.url}/api/admin/campaigns", body=definition)
        assert status == 201, created
        grab = f"/api/campaigns/{created['id']}/grab"
        winners = CampaignKeys.of(created["id"]).winners
        players = [f"p{i:02d}" for i in range(40)]
        tokens = await SessionStore(redis, 3600).mint([*players, "gone", "probe1", "probe2"])
        won: dict[str, int] = {}
        for token in tokens[:3]:
            status, answer = await call("POST", f"{topo.url}{grab}", token)
            assert (status, answer["result"]) == (200, "won")
            won[token] = answer["amount_fen"]
        assert sum(won.values()) == 300
        # Each worker learns the sell-out from the events channel: then a grab by a token
        # it has never confirmed sends Redis nothing.
        for worker, probe in zip(workers, tokens[-2:], strict=True):

            async def from_memory(worker: str = worker, probe: str = probe) -> bool:
                before = await command_calls(redis, *GRAB_COMMANDS)
                status, answer = await call("POST", f"{worker}{grab}", probe)
                assert (status, answer) == (200, {"result": "sold_out"})
                return await command_calls(redis, *GRAB_COMMANDS) == before

            await until(from_memory, f"{worker} kept asking Redis")

        # Through HAProxy, players neither worker has seen: no Redis command, not even
        # the sessions' MGET.
        before = await command_calls(redis, *GRAB_COMMANDS)
        fresh = tokens[3:40]
        answers = await asyncio.gather(*(call("POST", f"{topo.url}{grab}", t) for t in fresh))
        assert answers == [(200, {"result": "sold_out"})] * len(fresh)
        assert await command_calls(redis, *GRAB_COMMANDS) == before

        # A player who logged out is refused by every worker.
        gone = tokens[40]
        assert (await call("POST", f"{topo.url}/auth/logout", gone))[0] == 200
        for worker in workers:

            async def refused(worker: str = worker) -> bool:
                return (await call("POST", f"{worker}{grab}", gone))[0] == 401

            await until(refused, f"{worker} kept answering a logged-out player")
        # A winner asking again through HAProxy is told what it won, and nothing more
        # was granted.
        for token, amount in won.items():
            assert await call("POST", f"{topo.url}{grab}", token) == (
                200,
                {"result": "already_won", "amount_fen": amount},
            )
        assert await redis.hlen(winners) == 3
