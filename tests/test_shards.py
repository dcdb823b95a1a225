"""Sharded red packets ("shards": K) on one Redis: an in-process worker, real Redis and
PostgreSQL.

Invariants: the K sub-pools hold exactly the envelopes PostgreSQL recorded, dealt by
seq % K, their budgets summing to the campaign's; a grab falls through from an empty
home sub-pool to the first non-empty one in the player's order, so the campaign sells
out completely, and ``sold_out`` comes only once every sub-pool is empty; pause, resume
and end reach every sub-pool; each sub-pool closes out its own envelopes (one close-out
row per shard), won + refunded == the budget overall and per shard; results are final
only once every sub-pool is finished and drained; sold-out memory is kept per sub-pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from itertools import count as counter
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from app.background.drainer import REFRESH_S, Drainer
from app.identity.sessions import SessionStore
from app.local.embedded import EmbeddedRedis
from app.model import iso
from app.records import Envelope
from app.redpacket import results as red_packet_results
from app.redpacket import routing
from app.redpacket.spec import from_meta
from app.settings import Settings
from app.store.ledger import fetch_closeouts
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys, GrabStatus, Scripts, spread_pools
from app.web.factory import create_app
from app.web.keys import PG, REDIS
from tests.conftest import (
    ADMIN,
    GRAB_COMMANDS,
    PAGE,
    command_calls,
    until_answered_locally,
    until_live,
)
from tests.test_ledger import FAST, MANUAL

RED_PACKET = {"kind": "red_packet", "name": "分片红包"}


@pytest.fixture
async def app_client(aiohttp_client: Any, settings: Settings) -> TestClient:
    """An in-process worker whose drainer records grants promptly."""
    return await aiohttp_client(create_app(settings.with_(ledger=FAST)), headers=PAGE)


@pytest.fixture
async def manual_client(aiohttp_client: Any, settings: Settings) -> TestClient:
    """An in-process worker without a drainer: the test drains when it chooses."""
    return await aiohttp_client(create_app(settings.with_(ledger=MANUAL)), headers=PAGE)


async def create(client: TestClient, status: int = 201, **fields: Any) -> dict[str, Any]:
    """POST a red packet (``fields`` over RED_PACKET); assert ``status``."""
    resp = await client.post("/api/admin/campaigns", json={**RED_PACKET, **fields}, headers=ADMIN)
    body: dict[str, Any] = await resp.json()
    assert resp.status == status, body
    return body


async def stats(client: TestClient, cid: str) -> dict[str, Any]:
    resp = await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200, body
    return body


async def admin(client: TestClient, cid: str, action: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post(f"/api/admin/campaigns/{cid}/{action}", headers=ADMIN)
    return resp.status, await resp.json()


async def grab(client: TestClient, token: str, cid: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    return resp.status, await resp.json()


async def results_status(client: TestClient, cid: str) -> tuple[int, dict[str, Any]]:
    """GET the results (a worker remembers "not finished" for PENDING_S)."""
    resp = await client.get(f"/api/campaigns/{cid}/results")
    return resp.status, await resp.json()


async def final_results(client: TestClient, cid: str, within_s: float = 10) -> dict[str, Any]:
    """Poll (bounded) until the results are final."""
    deadline = time.monotonic() + within_s
    while True:
        status, body = await results_status(client, cid)
        if status == 200:
            return body
        assert body["error"] == "not_finished", body
        assert time.monotonic() < deadline, "the results never became final"
        await asyncio.sleep(0.1)


async def finished(redis: Redis, cid: str) -> str | None:
    """What the results decide from Redis now (not the worker's remembered answer)."""
    meta = await redis.hgetall(CampaignKeys.of(cid).meta)
    return await red_packet_results.finished(redis, from_meta(cid, meta))


async def pools_of(redis: Redis, pg: asyncpg.Connection, cid: str, shards: int) -> tuple[str, ...]:
    """The campaign's sub-pools, as PostgreSQL and Redis each record them (asserted equal,
    and equal to spread_pools); (cid,) for one shard."""
    config = orjson.loads(await pg.fetchval("SELECT config FROM campaigns WHERE id = $1", cid))
    listed = await redis.hget(CampaignKeys.of(cid).meta, "pools")
    if shards == 1:
        assert "pools" not in config
        assert listed is None
        return (cid,)
    pools = tuple(config["pools"])
    assert pools == tuple(listed.decode().split(",")) == spread_pools(cid, shards)
    assert len(pools) == shards
    return pools


async def envelopes_in(redis: Redis, pool_id: str) -> list[Envelope]:
    """What a pool still holds, in order."""
    return [
        Envelope.decode(raw) for raw in await redis.lrange(CampaignKeys.of(pool_id).pool, 0, -1)
    ]


async def winners_in(redis: Redis, pool_id: str) -> dict[str, Envelope]:
    raw = await redis.hgetall(CampaignKeys.of(pool_id).winners)
    return {k.decode(): Envelope.decode(v) for k, v in raw.items()}


def players_homed(pools: tuple[str, ...], shard: int, prefix: str) -> Iterator[str]:
    """Openids whose home sub-pool (first in routing.order) is ``pools[shard]``."""
    for i in counter():
        openid = f"{prefix}{i:05d}"
        if next(routing.order(pools, openid)) == pools[shard]:
            yield openid


def take(players: Iterator[str], n: int) -> list[str]:
    return [next(players) for _ in range(n)]


async def tokens_for(client: TestClient, openids: list[str]) -> dict[str, str]:
    tokens = await SessionStore(client.app[REDIS], 3600).mint(openids)
    return dict(zip(openids, tokens, strict=True))


async def drain(client: TestClient) -> None:
    """Drain every stream (and close out what the window ended) until nothing is left."""
    drainer = Drainer(client.app[REDIS], client.app[PG], MANUAL, "test-shards")
    for _ in range(50):
        if not await drainer.step():
            return
    raise AssertionError("the streams never drained")


async def drained(redis: Redis, pools: tuple[str, ...], within_s: float = 15) -> None:
    """Wait (bounded) until a worker's drainer has recorded every entry of ``pools``."""
    deadline = time.monotonic() + within_s
    while any([await redis.xlen(CampaignKeys.of(p).ledger) for p in pools]):
        assert time.monotonic() < deadline, "the ledger streams did not drain"
        await asyncio.sleep(0.05)


# --- Validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shards", "count"),
    [(0, 10), (257, 1000), ("5", 10), (2.0, 10), (True, 10), (None, 10), (11, 10), (6, 5)],
    ids=["zero", "257", "string", "float", "bool", "null", "more-than-count", "6-of-5"],
)
async def test_bad_shards_are_refused_naming_shards(
    app_client: TestClient, redis: Redis, pg: asyncpg.Connection, shards: Any, count: int
) -> None:
    resp = await app_client.post(
        "/api/admin/campaigns",
        json={**RED_PACKET, "total_fen": 10_000, "count": count, "shards": shards},
        headers=ADMIN,
    )
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"] == "invalid"
    assert body["field"] == "shards"
    assert isinstance(body["message"], str)
    assert "shards" in body["message"]
    # Nothing was created in either store.
    assert await pg.fetchval("SELECT count(*) FROM campaigns") == 0
    assert await redis.scard(CAMPAIGNS_SET) == 0


async def test_a_lottery_has_no_shards(app_client: TestClient, pg: asyncpg.Connection) -> None:
    lottery = {
        "kind": "lottery",
        "name": "抽奖",
        "tiers": [{"name": "红包", "stock": 10, "weight": 1, "value_fen": 100}],
        "no_prize_weight": 1,
        "quota_total": 3,
    }
    resp = await app_client.post("/api/admin/campaigns", json=lottery, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    resp = await app_client.post(
        "/api/admin/campaigns", json={**lottery, "shards": 2}, headers=ADMIN
    )
    body = await resp.json()
    assert resp.status == 422, body
    assert (body["error"], body["field"]) == ("invalid", "shards")
    assert isinstance(body["message"], str)
    assert "shards" in body["message"]
    assert await pg.fetchval("SELECT count(*) FROM campaigns") == 1


async def test_one_shard_by_default_and_at_the_bounds(
    app_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    created = await create(app_client, total_fen=1_000, count=10)
    cid = created["id"]
    assert created["shards"] == 1
    body = await stats(app_client, cid)
    assert body["shards"] == 1
    assert body["per_shard"] == [
        {
            "shard": 0,
            "remaining_count": 10,
            "remaining_fen": 1_000,
            "won_count": 0,
            "won_fen": 0,
            "refunded_count": 0,
            "refunded_fen": 0,
        }
    ]
    assert await pools_of(redis, pg, cid, 1) == (cid,)
    assert await redis.llen(CampaignKeys.of(cid).pool) == 10
    # "shards": 1 said outright is the default; count shards (one envelope each) and 256
    # are accepted.
    explicit = await create(app_client, total_fen=1_000, count=10, shards=1)
    assert (await stats(app_client, explicit["id"]))["per_shard"][0]["remaining_count"] == 10
    full = await create(app_client, total_fen=1_000, count=10, shards=10)
    one_each = (await stats(app_client, full["id"]))["per_shard"]
    assert [s["remaining_count"] for s in one_each] == [1] * 10
    widest = await create(app_client, total_fen=100_000, count=1_000, shards=256)
    per_shard = (await stats(app_client, widest["id"]))["per_shard"]
    assert [s["shard"] for s in per_shard] == list(range(256))
    assert {s["remaining_count"] for s in per_shard} == {3, 4}
    assert sum(s["remaining_fen"] for s in per_shard) == 100_000


# --- Creation ----------------------------------------------------------------------------


async def test_creation_deals_exactly_the_recorded_envelopes(
    app_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    shards, count, total = 5, 103, 88_888
    created = await create(app_client, total_fen=total, count=count, shards=shards)
    cid = created["id"]
    pools = await pools_of(redis, pg, cid, shards)
    assert len(set(pools)) == shards
    # Sub-pool k's hash slot lies in the k-th of K equal ranges.
    for k, pool_id in enumerate(pools):
        slot = key_slot(CampaignKeys.of(pool_id).meta.encode())
        assert k * REDIS_CLUSTER_HASH_SLOTS // shards <= slot
        assert slot < (k + 1) * REDIS_CLUSTER_HASH_SLOTS // shards

    recorded = {
        r["seq"]: r["amount_fen"]
        for r in await pg.fetch("SELECT seq, amount_fen FROM envelopes WHERE campaign_id = $1", cid)
    }
    assert sorted(recorded) == list(range(count))
    assert sum(recorded.values()) == total

    body = await stats(app_client, cid)
    assert (body["shards"], body["count"], body["total_fen"]) == (shards, count, total)
    assert (body["remaining_count"], body["remaining_fen"]) == (count, total)
    assert (body["won_count"], body["won_fen"], body["state"]) == (0, 0, "open")
    per_shard = body["per_shard"]
    assert [s["shard"] for s in per_shard] == list(range(shards))
    assert sum(s["remaining_count"] for s in per_shard) == count
    assert sum(s["remaining_fen"] for s in per_shard) == total
    sizes = [s["remaining_count"] for s in per_shard]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [21, 21, 21, 20, 20]  # seq % 5 of 0..102

    in_redis: dict[int, int] = {}
    for k, pool_id in enumerate(pools):
        held = await envelopes_in(redis, pool_id)
        assert {e.seq % shards for e in held} == {k}
        assert len(held) == per_shard[k]["remaining_count"]
        assert sum(e.amount_fen for e in held) == per_shard[k]["remaining_fen"]
        for e in held:
            assert e.seq not in in_redis
            in_redis[e.seq] = e.amount_fen
        meta = {
            field.decode(): value.decode()
            for field, value in (await redis.hgetall(CampaignKeys.of(pool_id).meta)).items()
        }
        assert meta["kind"] == "shard"
        assert (meta["campaign"], int(meta["shard"])) == (cid, k)
        assert int(meta["count"]) == len(held)
        assert int(meta["total_fen"]) == sum(e.amount_fen for e in held)
        assert (int(meta["won_count"]), int(meta["won_fen"])) == (0, 0)
        assert await redis.hlen(CampaignKeys.of(pool_id).winners) == 0
    assert in_redis == recorded
    # The campaign's own keys hold no envelopes; drainers follow it and every sub-pool.
    own = CampaignKeys.of(cid)
    assert await redis.llen(own.pool) == 0
    assert await redis.hget(own.meta, "won_count") == b"0"
    assert {m.decode() for m in await redis.smembers(CAMPAIGNS_SET)} == {cid, *pools}


# --- Fall-through ------------------------------------------------------------------------


async def test_fall_through_tail_sells_out_in_routing_order(
    app_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    shards, count, total = 4, 40, 4_000
    cid = (await create(app_client, total_fen=total, count=count, shards=shards))["id"]
    pools = await pools_of(redis, pg, cid, shards)
    homed_0 = players_homed(pools, 0, "home0-")
    anyone = (f"any-{i:03d}" for i in counter())
    first = take(homed_0, 10)
    tail = take(homed_0, 25) + take(anyone, 15)  # 40 players for the 30 left
    tokens = await tokens_for(app_client, first + tail)
    told: dict[str, int] = {}

    # Players homed in sub-pool 0 empty it, each winning there.
    for openid in first:
        status, body = await grab(app_client, tokens[openid], cid)
        assert (status, body["result"]) == (200, "won"), body
        told[openid] = body["amount_fen"]
    assert await redis.llen(CampaignKeys.of(pools[0]).pool) == 0
    assert set(await winners_in(redis, pools[0])) == set(first)
    # One sub-pool sold out (and its grants recorded) is not the campaign's end.
    await drained(redis, pools)
    assert await finished(redis, cid) is None
    checked_all_but_one = False

    # Then every grab wins in the first non-empty sub-pool of the player's order, until
    # none is left; only then sold out.
    for openid in tail:
        left = {p: await redis.llen(CampaignKeys.of(p).pool) for p in pools}
        status, body = await grab(app_client, tokens[openid], cid)
        assert status == 200, body
        expected = next((p for p in routing.order(pools, openid) if left[p]), None)
        if expected is None:
            assert body == {"result": "sold_out"}
            continue
        assert body["result"] == "won", (openid, left, body)
        won_in = [p for p in pools if await redis.hexists(CampaignKeys.of(p).winners, openid)]
        assert won_in == [expected], (openid, list(routing.order(pools, openid)), left)
        assert await redis.llen(CampaignKeys.of(expected).pool) == left[expected] - 1
        told[openid] = body["amount_fen"]
        empty = [p for p in pools if not await redis.llen(CampaignKeys.of(p).pool)]
        if len(empty) == shards - 1 and not checked_all_but_one:
            await drained(redis, pools)
            assert await finished(redis, cid) is None
            checked_all_but_one = True
    # The players homed in 0 who came after it ran dry won elsewhere: the tail sold out.
    assert sum(1 for openid in tail[:25] if openid in told) == 25
    assert len(told) == count
    assert sum(told.values()) == total
    assert checked_all_but_one

    winners: dict[str, Envelope] = {}
    for pool_id in pools:
        assert await redis.llen(CampaignKeys.of(pool_id).pool) == 0
        theirs = await winners_in(redis, pool_id)
        assert not set(theirs) & set(winners)
        winners.update(theirs)
    assert {o: e.amount_fen for o, e in winners.items()} == told
    assert sorted(e.seq for e in winners.values()) == list(range(count))
    body = await stats(app_client, cid)
    assert (body["state"], body["remaining_count"], body["remaining_fen"]) == ("sold_out", 0, 0)
    assert (body["won_count"], body["won_fen"]) == (count, total)
    # Sold out everywhere and drained: the results are final.
    final = await final_results(app_client, cid)
    assert (final["state"], final["won_count"], final["won_fen"]) == ("sold_out", count, total)
    assert final["best"]["amount_fen"] == max(told.values())
    assert await finished(redis, cid) == "sold_out"


# --- Lifecycle ---------------------------------------------------------------------------


async def test_pause_resume_end_reach_every_sub_pool_and_close_each_out(
    manual_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    client = manual_client
    shards, count, total = 4, 40, 10_000
    cid = (await create(client, total_fen=total, count=count, shards=shards))["id"]
    pools = await pools_of(redis, pg, cid, shards)
    homed = [take(players_homed(pools, k, f"h{k}-"), 4) for k in range(shards)]
    tokens = await tokens_for(client, [o for group in homed for o in group])
    await until_live(client)
    scripts = Scripts(redis)

    for group in homed:
        status, body = await grab(client, tokens[group[0]], cid)
        assert (status, body["result"]) == (200, "won")

    status, paused = await admin(client, cid, "pause")
    assert (status, paused["state"]) == (200, "paused")
    for k, group in enumerate(homed):
        status, body = await grab(client, tokens[group[1]], cid)
        assert (status, body["error"]) == (409, "paused")
        # Each sub-pool's own script refuses, whatever the worker remembers.
        assert await redis.hget(CampaignKeys.of(pools[k]).meta, "paused") == b"1"
        assert (await scripts.grab_envelope(pools[k], [group[1]])).status is GrabStatus.PAUSED
        assert await redis.hlen(CampaignKeys.of(pools[k]).winners) == 1
    await drain(client)
    assert await finished(redis, cid) is None  # paused is not finished

    status, resumed = await admin(client, cid, "resume")
    assert (status, resumed["state"]) == (200, "open")
    for k, group in enumerate(homed):
        assert await redis.hget(CampaignKeys.of(pools[k]).meta, "paused") == b"0"
        status, body = await grab(client, tokens[group[1]], cid)
        assert (status, body["result"]) == (200, "won")
        assert set(await winners_in(redis, pools[k])) == set(group[:2])

    status, ended = await admin(client, cid, "end")
    assert (status, ended["state"]) == (200, "ended")
    assert (ended["won_count"], ended["refunded_count"]) == (8, count - 8)
    assert ended["won_fen"] + ended["refunded_fen"] == total
    assert ended["remaining_fen"] == total - ended["won_fen"]
    dealt = await pg.fetch("SELECT seq, amount_fen FROM envelopes WHERE campaign_id = $1", cid)
    per_shard = ended["per_shard"]
    for k, shard in enumerate(per_shard):
        mine = [r["amount_fen"] for r in dealt if r["seq"] % shards == k]
        assert shard["shard"] == k
        assert (shard["won_count"], shard["refunded_count"]) == (2, len(mine) - 2)
        assert shard["won_fen"] + shard["refunded_fen"] == sum(mine)
        meta = CampaignKeys.of(pools[k]).meta
        assert await redis.hget(meta, "closed_ms") is not None
    for name in ("won_count", "won_fen", "refunded_count", "refunded_fen"):
        assert ended[name] == sum(s[name] for s in per_shard)
    for k, group in enumerate(homed):
        status, body = await grab(client, tokens[group[2]], cid)
        assert (status, body["error"]) == (409, "ended")
        assert (await scripts.grab_envelope(pools[k], [group[2]])).status is GrabStatus.ENDED
    assert (await admin(client, cid, "end")) == (200, ended)
    for action in ("pause", "resume"):
        assert (await admin(client, cid, action))[1]["error"] == "ended"

    # Closed out everywhere, but PostgreSQL does not have it yet: not final.
    assert await finished(redis, cid) is None
    assert await fetch_closeouts(client.app[PG], cid) == {}
    await drain(client)
    closeouts = await fetch_closeouts(client.app[PG], cid)
    assert sorted(closeouts) == list(range(shards))
    for k, closeout in closeouts.items():
        assert (closeout.refunded_count, closeout.refunded_fen) == (
            per_shard[k]["refunded_count"],
            per_shard[k]["refunded_fen"],
        )
    assert sum(c.refunded_fen for c in closeouts.values()) == ended["refunded_fen"]
    granted = await pg.fetch(
        "SELECT openid, seq, amount_fen FROM grabs WHERE campaign_id = $1", cid
    )
    assert len(granted) == 8
    assert sum(r["amount_fen"] for r in granted) + ended["refunded_fen"] == total
    assert await pg.fetchval("SELECT ended_at FROM campaigns WHERE id = $1", cid) is not None
    assert await finished(redis, cid) == "ended"
    final = await final_results(client, cid)
    assert (final["state"], final["won_count"], final["won_fen"]) == ("ended", 8, ended["won_fen"])


async def test_grabs_racing_the_end_add_up_in_every_sub_pool(
    manual_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    """The end closes the sub-pools one after another while grabs go on: whatever each
    grab was told, grants + refunds == the budget, overall and per sub-pool."""
    client = manual_client
    shards, count, total = 4, 200, 50_000
    cid = (await create(client, total_fen=total, count=count, shards=shards))["id"]
    pools = await pools_of(redis, pg, cid, shards)
    openids = [f"r{i:04d}" for i in range(300)]
    tokens = await tokens_for(client, openids)

    async def won_so_far() -> int:
        counts = [await redis.hget(CampaignKeys.of(p).meta, "won_count") for p in pools]
        return sum(int(c or 0) for c in counts)

    async def end_soon() -> tuple[int, dict[str, Any]]:
        while await won_so_far() < 50:
            await asyncio.sleep(0.001)
        return await admin(client, cid, "end")

    sem = asyncio.Semaphore(50)

    async def limited(openid: str) -> tuple[int, dict[str, Any]]:
        async with sem:
            return await grab(client, tokens[openid], cid)

    answers, (status, ended) = await asyncio.gather(
        asyncio.gather(*(limited(o) for o in openids)), end_soon()
    )
    assert status == 200
    told = {o: b["amount_fen"] for o, (s, b) in zip(openids, answers, strict=True) if s == 200}
    assert {b["error"] for s, b in answers if s != 200} <= {"ended"}
    assert all(b["result"] == "won" for s, b in answers if s == 200)
    assert 50 <= len(told) < count
    assert (ended["won_count"], ended["won_fen"]) == (len(told), sum(told.values()))
    assert ended["won_fen"] + ended["refunded_fen"] == total
    assert ended["won_count"] + ended["refunded_count"] == count
    union: dict[str, Envelope] = {}
    for k, (pool_id, shard) in enumerate(zip(pools, ended["per_shard"], strict=True)):
        theirs = await winners_in(redis, pool_id)
        assert not set(theirs) & set(union)
        union.update(theirs)
        dealt = await pg.fetch(
            "SELECT amount_fen FROM envelopes WHERE campaign_id = $1 AND seq % $2 = $3",
            cid,
            shards,
            k,
        )
        assert (shard["won_count"], shard["won_fen"]) == (
            len(theirs),
            sum(e.amount_fen for e in theirs.values()),
        )
        assert shard["won_count"] + shard["refunded_count"] == len(dealt)
        assert shard["won_fen"] + shard["refunded_fen"] == sum(r["amount_fen"] for r in dealt)
    assert {o: e.amount_fen for o, e in union.items()} == told
    await drain(client)
    rows = await pg.fetch("SELECT openid, seq, amount_fen FROM grabs WHERE campaign_id = $1", cid)
    assert {r["openid"]: Envelope(r["seq"], r["amount_fen"]) for r in rows} == union
    closeouts = await fetch_closeouts(client.app[PG], cid)
    assert sorted(closeouts) == list(range(shards))
    assert sum(c.refunded_fen for c in closeouts.values()) + sum(told.values()) == total


async def test_results_wait_for_every_sub_pool(
    manual_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    """A sub-pool closed out alone (an end whose fan-out stopped half way) does not make
    the campaign final: every sub-pool must be."""
    client = manual_client
    cid = (await create(client, total_fen=3_000, count=30, shards=3))["id"]
    pools = await pools_of(redis, pg, cid, 3)
    scripts = Scripts(redis)
    for pool_id in pools[:2]:
        await scripts.close_campaign(pool_id, end_now=True)
    await drain(client)
    assert sorted(await fetch_closeouts(client.app[PG], cid)) == [0, 1]
    assert await finished(redis, cid) is None
    assert (await results_status(client, cid))[1]["error"] == "not_finished"
    status, ended = await admin(client, cid, "end")
    assert (status, ended["refunded_count"], ended["refunded_fen"]) == (200, 30, 3_000)
    assert await finished(redis, cid) is None  # the last close-out is not recorded yet
    await drain(client)
    closeouts = await fetch_closeouts(client.app[PG], cid)
    assert sorted(closeouts) == [0, 1, 2]
    assert sum(c.refunded_count for c in closeouts.values()) == 30
    final = await final_results(client, cid)
    assert (final["state"], final["won_count"]) == ("ended", 0)


async def test_the_window_passing_closes_out_every_sub_pool(
    manual_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    client = manual_client
    shards, count, total = 3, 30, 3_000
    ends = int(time.time() * 1000) + 1_500
    cid = (await create(client, total_fen=total, count=count, shards=shards, ends_at=iso(ends)))[
        "id"
    ]
    pools = await pools_of(redis, pg, cid, shards)
    openids = [f"w{i:02d}" for i in range(7)]
    tokens = await tokens_for(client, openids)
    won = 0
    for openid in openids:
        status, body = await grab(client, tokens[openid], cid)
        assert (status, body["result"]) == (200, "won")
        won += body["amount_fen"]
    while int(time.time() * 1000) < ends + 50:
        await asyncio.sleep(0.05)
    assert (await stats(client, cid))["refunded_count"] == 0  # nobody noticed yet
    assert await finished(redis, cid) is None
    await drain(client)
    body = await stats(client, cid)
    assert (body["state"], body["refunded_count"], body["refunded_fen"]) == (
        "ended",
        count - 7,
        total - won,
    )
    for pool_id, shard in zip(pools, body["per_shard"], strict=True):
        assert await redis.hget(CampaignKeys.of(pool_id).meta, "closed_ms") is not None
        dealt = await pg.fetchval(
            "SELECT count(*) FROM envelopes WHERE campaign_id = $1 AND seq % $2 = $3",
            cid,
            shards,
            shard["shard"],
        )
        assert shard["won_count"] + shard["refunded_count"] == dealt
    closeouts = await fetch_closeouts(client.app[PG], cid)
    assert sorted(closeouts) == list(range(shards))
    assert sum(c.refunded_fen for c in closeouts.values()) == total - won
    assert {c.ended_ms for c in closeouts.values()} == {ends}  # the window's end
    final = await final_results(client, cid)
    assert (final["state"], final["won_fen"]) == ("ended", won)
    # Closed out and drained: at the next refresh the drainers let go of every sub-pool.
    await asyncio.sleep(REFRESH_S)
    await drain(client)
    assert not {m.decode() for m in await redis.smembers(CAMPAIGNS_SET)} & {cid, *pools}


# --- Sold-out memory ---------------------------------------------------------------------


@pytest.fixture
async def own(
    aiohttp_client: Any, settings: Settings, private_redis_server: EmbeddedRedis
) -> AsyncIterator[tuple[TestClient, Redis]]:
    """A worker on a Redis of the test's own, whose command counters see nobody else."""
    client = await aiohttp_client(
        create_app(settings.with_(redis_url=private_redis_server.url, ledger=MANUAL)),
        headers=PAGE,
    )
    redis = Redis.from_url(private_redis_server.url)
    yield client, redis
    await redis.aclose()


async def test_sold_out_memory_is_per_sub_pool(
    own: tuple[TestClient, Redis], pg: asyncpg.Connection
) -> None:
    client, redis = own
    shards, count = 3, 30
    cid = (await create(client, total_fen=3_000, count=count, shards=shards))["id"]
    pools = await pools_of(redis, pg, cid, shards)
    homed_0 = players_homed(pools, 0, "s0-")
    first = take(homed_0, 10)
    later = take(homed_0, 30)
    losers = [f"late-{i}" for i in range(5)]
    tokens = await tokens_for(client, first + later + losers)
    await until_live(client)
    told: dict[str, int] = {}
    for openid in first:
        status, body = await grab(client, tokens[openid], cid)
        assert body["result"] == "won"
        told[openid] = body["amount_fen"]

    # Sub-pool 0 is empty: once the worker knows it, a grab homed there calls the script
    # of the next sub-pool only (one call, not two).
    scripts_calls = ("evalsha", "eval")
    queue = iter(later)
    deadline = time.monotonic() + 5
    costs = []
    for openid in queue:
        before = await command_calls(redis, *scripts_calls)
        status, body = await grab(client, tokens[openid], cid)
        assert (status, body["result"]) == (200, "won")
        told[openid] = body["amount_fen"]
        costs.append(await command_calls(redis, *scripts_calls) - before)
        if costs[-1] == 1:
            break
        assert costs[-1] == 2, costs
        assert time.monotonic() < deadline, "the worker never learned sub-pool 0 ran out"
        await asyncio.sleep(0.02)
    for openid in queue:
        before = await command_calls(redis, *scripts_calls)
        status, body = await grab(client, tokens[openid], cid)
        if body["result"] == "sold_out":
            break
        assert body["result"] == "won"
        told[openid] = body["amount_fen"]
        # Sub-pools run out one by one: each grab costs at most one call per sub-pool
        # not known sold out, and here never the first.
        assert await command_calls(redis, *scripts_calls) - before <= shards - 1
    assert len(told) == count
    for pool_id in pools:
        assert await redis.llen(CampaignKeys.of(pool_id).pool) == 0

    # Every sub-pool sold out and known: a loser is answered from memory, no Redis at all.
    async def loser() -> None:
        assert await grab(client, tokens[losers[0]], cid) == (200, {"result": "sold_out"})

    await until_answered_locally(loser, redis)
    for openid in losers:  # their sessions verified once, then remembered
        assert (
            await client.get(f"/api/campaigns/{cid}/me", cookies={"hb_session": tokens[openid]})
        ).status == 200
    before = await command_calls(redis, *GRAB_COMMANDS)
    for openid in losers:
        assert await grab(client, tokens[openid], cid) == (200, {"result": "sold_out"})
    assert await command_calls(redis, *GRAB_COMMANDS) == before
    # A winner (in whichever sub-pool) still gets already_won with the amount, by a
    # lookup: no script call.
    before = await command_calls(redis, *scripts_calls)
    for openid in [*first[:3], *later[:3], *[o for o in later if o in told][-3:]]:
        assert await grab(client, tokens[openid], cid) == (
            200,
            {"result": "already_won", "amount_fen": told[openid]},
        )
    assert await command_calls(redis, *scripts_calls) == before


# --- Player views ------------------------------------------------------------------------


async def test_me_and_the_public_view_sum_over_sub_pools(
    app_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    shards, count = 3, 4  # sub-pools of 2, 1, 1 envelopes
    cid = (await create(app_client, total_fen=400, count=count, shards=shards))["id"]
    pools = await pools_of(redis, pg, cid, shards)
    view = await (await app_client.get(f"/api/campaigns/{cid}")).json()
    assert (view["state"], view["remaining_count"]) == ("open", count)
    homed_1 = players_homed(pools, 1, "v1-")
    at_home, fell_through = next(homed_1), next(homed_1)
    bystander = "v-bystander"
    tokens = await tokens_for(app_client, [at_home, fell_through, bystander])

    async def me(openid: str) -> dict[str, Any]:
        resp = await app_client.get(
            f"/api/campaigns/{cid}/me", cookies={"hb_session": tokens[openid]}
        )
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body

    assert await me(at_home) == {"result": "none"}
    told = {}
    for openid in (at_home, fell_through):
        status, body = await grab(app_client, tokens[openid], cid)
        assert (status, body["result"]) == (200, "won")
        told[openid] = body["amount_fen"]
    # Sub-pool 1 held one envelope: the second player won in another sub-pool.
    assert set(await winners_in(redis, pools[1])) == {at_home}
    elsewhere = [p for p in pools if fell_through in await winners_in(redis, p)]
    assert len(elsewhere) == 1
    assert elsewhere != [pools[1]]
    for openid, amount in told.items():
        assert await me(openid) == {"result": "won", "amount_fen": amount}
    assert await me(bystander) == {"result": "none"}
    view = await (await app_client.get(f"/api/campaigns/{cid}")).json()
    left = [await redis.llen(CampaignKeys.of(p).pool) for p in pools]
    assert view["remaining_count"] == sum(left) == count - 2
    assert view["state"] == "open"
    status, body = await grab(app_client, tokens[bystander], cid)
    assert body["result"] == "won"
    status, body = await grab(app_client, tokens[fell_through], cid)
    assert body == {"result": "already_won", "amount_fen": told[fell_through]}
    view = await (await app_client.get(f"/api/campaigns/{cid}")).json()
    assert view["remaining_count"] == 1
