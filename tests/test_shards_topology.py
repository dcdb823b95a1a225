"""The core invariant of sharded red packets as players meet it: HAProxy in front of two
real workers on one Redis, 2,000 players for 1,200 envelopes, each player sending 2 or 3
grabs at once, on K = 5 sub-pools and on K = 1 for comparison.

Invariants: at most one envelope per player across all sub-pools (the winners hashes are
disjoint, each envelope in the sub-pool it was dealt to); exact count and sum once sold
out; a player's concurrent grabs answer one ``won`` and the rest ``already_won`` with
the same amount, or all ``sold_out``; a winner asking again gets ``already_won`` with
that amount from either worker; no grab sent after some player was told ``sold_out``
wins (``sold_out`` only once every sub-pool is empty); the drainers' PostgreSQL grabs
equal the union of the winners hashes, envelope by envelope.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, NamedTuple

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from app.identity.sessions import SessionStore
from app.local.haproxy import haproxy_binary
from app.records import Envelope
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN, PAGE
from tests.test_shards import pools_of, winners_in
from tests.test_topology import Topology, topology

__all__ = ["topology"]  # a fixture, imported for this module's test

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed"),
]

PLAYERS, ENVELOPES, TOTAL_FEN = 2_000, 1_200, 1_234_567
# Players whose grabs are in flight at once (each sends 2 or 3 together).
PLAYERS_AT_ONCE = 32


class Answer(NamedTuple):
    """One grab as the player saw it: when it was sent and answered, and the answer."""

    sent: float
    answered: float
    status: int
    body: dict[str, Any]


@pytest.mark.parametrize("shards", [1, 5])
async def test_2000_players_concurrent_retries_two_workers(
    topology: Topology, redis_url: str, database_url: str, shards: int
) -> None:
    url = topology.url
    workers = [f"http://127.0.0.1:{port}" for port in topology.worker_ports.values()]
    redis = Redis.from_url(redis_url)
    pg = await asyncpg.connect(database_url)
    connector = aiohttp.TCPConnector(limit=3 * PLAYERS_AT_ONCE)
    http = aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), connector=connector, headers=PAGE
    )
    try:
        body = {
            "kind": "red_packet",
            "name": "分片",
            "total_fen": TOTAL_FEN,
            "count": ENVELOPES,
            "shards": shards,
        }
        async with http.post(f"{url}/api/admin/campaigns", json=body, headers=ADMIN) as resp:
            assert resp.status == 201, await resp.text()
            cid = (await resp.json())["id"]
        pools = await pools_of(redis, pg, cid, shards)
        openids = [f"p{i:05d}" for i in range(PLAYERS)]
        tokens = dict(zip(openids, await SessionStore(redis, 3600).mint(openids), strict=True))

        async def grab_once(base: str, openid: str) -> Answer:
            sent = time.monotonic()
            async with http.post(
                f"{base}/api/campaigns/{cid}/grab",
                headers={"Cookie": f"hb_session={tokens[openid]}"},
            ) as resp:
                answer = await resp.json()
                return Answer(sent, time.monotonic(), resp.status, answer)

        sem = asyncio.Semaphore(PLAYERS_AT_ONCE)

        async def player(i: int, openid: str) -> list[Answer]:
            # 2 or 3 grabs at once: a double tap and the page's retry racing the first.
            async with sem:
                return list(
                    await asyncio.gather(*(grab_once(url, openid) for _ in range(2 + i % 2)))
                )

        answers = dict(
            zip(
                openids,
                await asyncio.gather(*(player(i, o) for i, o in enumerate(openids))),
                strict=True,
            )
        )

        failed = [
            (o, a.status, a.body) for o, mine in answers.items() for a in mine if a.status != 200
        ]
        assert not failed, failed[:5]
        told: dict[str, int] = {}
        for openid, mine in answers.items():
            results = Counter(a.body["result"] for a in mine)
            if results == {"sold_out": len(mine)}:
                continue
            assert results == {"won": 1, "already_won": len(mine) - 1}, (openid, results)
            amounts = {a.body["amount_fen"] for a in mine}
            assert len(amounts) == 1, (openid, [a.body for a in mine])
            told[openid] = amounts.pop()
        assert len(told) == ENVELOPES
        assert sum(told.values()) == TOTAL_FEN
        # sold_out only once every sub-pool is empty: nothing sent after a player was told
        # sold out won.
        first_sold_out = min(
            a.answered for mine in answers.values() for a in mine if a.body["result"] == "sold_out"
        )
        late_wins = [
            o
            for o, mine in answers.items()
            for a in mine
            if a.body["result"] == "won" and a.sent > first_sold_out
        ]
        assert not late_wins, late_wins[:5]

        # Redis: each sub-pool empty, its winners holding only envelopes dealt to it, the
        # winners hashes disjoint, their union what players were told.
        union: dict[str, Envelope] = {}
        for k, pool_id in enumerate(pools):
            assert await redis.llen(CampaignKeys.of(pool_id).pool) == 0
            theirs = await winners_in(redis, pool_id)
            assert {e.seq % shards for e in theirs.values()} <= {k}
            assert not set(theirs) & set(union), "a player won in two sub-pools"
            union.update(theirs)
        assert {o: e.amount_fen for o, e in union.items()} == told
        assert sorted(e.seq for e in union.values()) == list(range(ENVELOPES))

        async with http.get(f"{url}/api/admin/campaigns/{cid}", headers=ADMIN) as resp:
            stats = await resp.json()
        assert (stats["state"], stats["shards"]) == ("sold_out", shards)
        assert (stats["won_count"], stats["won_fen"]) == (ENVELOPES, TOTAL_FEN)
        assert (stats["remaining_count"], stats["remaining_fen"]) == (0, 0)
        dealt = [len(range(k, ENVELOPES, shards)) for k in range(shards)]
        assert [s["won_count"] for s in stats["per_shard"]] == dealt
        assert [s["remaining_count"] for s in stats["per_shard"]] == [0] * shards

        # A winner asking again, on either worker, gets what they won; a loser sold_out.
        winners = list(told)
        losers = [o for o in openids if o not in told][:200]
        limit = asyncio.Semaphore(3 * PLAYERS_AT_ONCE)

        async def again(base: str, openid: str) -> tuple[str, Answer]:
            async with limit:
                return openid, await grab_once(base, openid)

        retries = await asyncio.gather(*(again(w, o) for w in workers for o in (*winners, *losers)))
        for openid, answer in retries:
            if openid in told:
                expected = {"result": "already_won", "amount_fen": told[openid]}
            else:
                expected = {"result": "sold_out"}
            assert (answer.status, answer.body) == (200, expected), openid
        # Both workers settled grabs.
        assert topology.grab_lines("w1") > 0
        assert topology.grab_lines("w2") > 0

        # The workers' drainers: PostgreSQL holds exactly the winners hashes' envelopes.
        deadline = time.monotonic() + 60
        while any([await redis.xlen(CampaignKeys.of(p).ledger) for p in pools]):
            assert time.monotonic() < deadline, "the ledger streams did not drain"
            await asyncio.sleep(0.2)
        rows = await pg.fetch(
            "SELECT openid, seq, amount_fen FROM grabs WHERE campaign_id = $1", cid
        )
        assert {r["openid"]: Envelope(r["seq"], r["amount_fen"]) for r in rows} == union
        assert len(rows) == ENVELOPES
        assert (
            await pg.fetchval("SELECT count(*) FROM ledger_rejects WHERE campaign_id = $1", cid)
            == 0
        )
    finally:
        await http.close()
        await pg.close()
        await redis.aclose()
