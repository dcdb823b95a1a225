"""Split kinds (random, fixed) and the public results of red packets and lotteries, on the
real app, Redis and PostgreSQL: money adds up, 手气最佳 is the largest envelope, the
answers are final, cached per worker, and match the published contract."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from app.campaigns.operations import rebuild
from app.local.embedded import EmbeddedRedis
from app.records import Envelope
from app.settings import Settings
from app.store.results import public_name
from app.store.scripts import CampaignKeys
from app.web.factory import create_app
from tests.cluster_support import (  # noqa: F401 - fixtures
    cluster_clean_fixture,
    cluster_fixture,
    cluster_redis_fixture,
    cluster_settings_fixture,
)
from tests.conftest import ADMIN, PAGE, command_calls, create_campaign, login
from tests.test_ledger import FAST, wait_drained
from tests.test_lottery_api import LOTTERY
from tests.test_openapi import Contract
from tests.test_times import TIME

RESULTS = "/api/campaigns/{id}/results"


@pytest.fixture
async def app_client(aiohttp_client: Any, settings: Settings) -> TestClient:
    """An in-process worker whose drainer records grants promptly."""
    return await aiohttp_client(create_app(settings.with_(ledger=FAST)), headers=PAGE)


@pytest.fixture
async def contract(app_client: TestClient) -> Contract:
    return Contract(await (await app_client.get("/api/openapi.json")).json())


@pytest.fixture
async def own(
    aiohttp_client: Any, settings: Settings, private_redis_server: EmbeddedRedis
) -> AsyncIterator[tuple[TestClient, Redis, Contract]]:
    """A worker on a Redis of the test's own, whose command counters see nobody else (other
    test runs share the machine's Redis server), a client on it and the document."""
    own_settings = settings.with_(redis_url=private_redis_server.url, ledger=FAST)
    client = await aiohttp_client(create_app(own_settings), headers=PAGE)
    redis = Redis.from_url(private_redis_server.url)
    contract = Contract(await (await client.get("/api/openapi.json")).json())
    yield client, redis, contract
    await redis.aclose()


async def results(
    client: TestClient, contract: Contract, cid: str, status: int = 200
) -> tuple[dict[str, Any], str]:
    """GET the results, checked against the document; body and Cache-Control."""
    resp = await client.get(RESULTS.format(id=cid))
    body = await resp.read()
    contract.check("get", RESULTS, resp.status, resp.content_type, body)
    assert resp.status == status, body
    return orjson.loads(body), resp.headers.get("Cache-Control", "")


async def final_results(
    client: TestClient, contract: Contract, cid: str, within_s: float = 30
) -> tuple[dict[str, Any], str]:
    """Poll (bounded) until the red packet's results are final."""
    deadline = time.monotonic() + within_s
    while True:
        resp = await client.get(RESULTS.format(id=cid))
        if resp.status == 200:
            return await results(client, contract, cid)
        assert resp.status == 409, await resp.text()
        assert time.monotonic() < deadline, "the results never became final"
        await asyncio.sleep(0.3)


async def grab_all(client: TestClient, cid: str, openids: list[str]) -> list[dict[str, Any]]:
    """Each player grabs once, one after another (so their grants are ordered)."""
    tokens = [await login(client, openid) for openid in openids]
    client.session.cookie_jar.clear()
    out = []
    for token in tokens:
        resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
        assert resp.status == 200, await resp.text()
        out.append(await resp.json())
    return out


async def create(client: TestClient, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    resp = await client.post("/api/admin/campaigns", json=body, headers=ADMIN)
    data: dict[str, Any] = await resp.json()
    assert resp.status == status, data
    return data


RED_PACKET = {"kind": "red_packet", "name": "普通红包", "total_fen": 1_000, "count": 10}


# --- Split kinds -------------------------------------------------------------------------


async def test_fixed_split_every_envelope_equal_and_exact(
    app_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    created = await create(app_client, {**RED_PACKET, "split": "fixed"})
    cid = created["id"]
    assert created["split"] == "fixed"
    pool = await redis.lrange(CampaignKeys.of(cid).pool, 0, -1)
    assert [Envelope.decode(e).amount_fen for e in pool] == [100] * 10
    rows = await pg.fetch("SELECT amount_fen FROM envelopes WHERE campaign_id = $1", cid)
    assert [r["amount_fen"] for r in rows] == [100] * 10
    assert orjson.loads(await pg.fetchval("SELECT config FROM campaigns WHERE id = $1", cid)) == {
        "split": "fixed"
    }
    assert await redis.hget(CampaignKeys.of(cid).meta, "split") == b"fixed"

    grabbed = await grab_all(app_client, cid, [f"fixed{i:02d}" for i in range(12)])
    assert Counter(g["result"] for g in grabbed) == {"won": 10, "sold_out": 2}
    assert {g["amount_fen"] for g in grabbed if g["result"] == "won"} == {100}
    stats = await (await app_client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert (stats["won_fen"], stats["remaining_fen"], stats["split"]) == (1_000, 0, "fixed")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"split": "fixed", "total_fen": 1_001}, "split"),
        ({"split": "fixed", "total_fen": 7, "count": 10}, "total_fen"),
        ({"split": "fixed", "min_fen": 101}, "total_fen"),
        ({"split": "fixed", "max_fen": 99}, "total_fen"),
        ({"split": "even"}, "split"),
        ({"split": None}, "split"),
        ({"split": 1}, "split"),
    ],
)
async def test_bad_splits_are_422_naming_the_field(
    app_client: TestClient, pg: asyncpg.Connection, fields: dict[str, Any], field: str
) -> None:
    error = await create(app_client, {**RED_PACKET, **fields}, status=422)
    assert (error["error"], error["field"]) == ("invalid", field)
    assert await pg.fetchval("SELECT count(*) FROM campaigns") == 0


async def test_random_split_is_the_default_and_unchanged(
    app_client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    for body in (RED_PACKET, {**RED_PACKET, "split": "random"}):
        created = await create(app_client, {**body, "total_fen": 100_000, "count": 50})
        assert created["split"] == "random"
        pool = await redis.lrange(CampaignKeys.of(created["id"]).pool, 0, -1)
        amounts = [Envelope.decode(e).amount_fen for e in pool]
        assert (len(amounts), sum(amounts)) == (50, 100_000)
        # Double mean over 50 envelopes: all equal would be a 1 in astronomically many.
        assert len(set(amounts)) > 1


async def test_rebuild_keeps_the_split(
    app_client: TestClient, redis: Redis, settings: Settings
) -> None:
    cid = (await create(app_client, {**RED_PACKET, "split": "fixed"}))["id"]
    await grab_all(app_client, cid, ["early"])
    await wait_drained(redis, cid)
    keys = CampaignKeys.of(cid)
    await redis.delete(keys.meta, keys.pool, keys.winners, keys.ledger)
    pg_pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        result = await rebuild(redis, pg_pool, cid)
    finally:
        await pg_pool.close()
    assert (result.winners.fen, result.pool.fen) == (100, 900)
    assert await redis.hget(keys.meta, "split") == b"fixed"
    # A fresh worker reads the definition from the rebuilt meta.
    other = create_app(settings.with_(ledger=FAST))
    async with TestServer(other) as server, TestClient(server) as fresh:
        stats = await (await fresh.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert stats["split"] == "fixed"


# --- Red packet results ------------------------------------------------------------------


def test_public_names() -> None:
    assert public_name("oAbCdEfGhIjK12") == "oA***12"
    assert public_name("alice") == "al***ce"
    assert public_name("bob") == "b***"
    assert public_name("oAbCdEfGhIjK12", "小明") == "小明"


async def test_results_after_sell_out_best_luck_and_winners(
    own: tuple[TestClient, Redis, Contract], pg: asyncpg.Connection
) -> None:
    app_client, redis, contract = own
    cid = str((await create_campaign(app_client, total_fen=8_888, count=25))["id"])
    error, cache = await results(app_client, contract, cid, 409)
    assert error["error"] == "not_finished"
    assert cache == "public, max-age=2"

    players = [f"player{i:02d}" for i in range(30)]
    grabbed = await grab_all(app_client, cid, players)
    assert Counter(g["result"] for g in grabbed) == {"won": 25, "sold_out": 5}
    won = {p: g["amount_fen"] for p, g in zip(players, grabbed, strict=True) if "amount_fen" in g}
    # One winner logged in with snsapi_userinfo: shown by nickname.
    await pg.execute("INSERT INTO player_names (openid, nickname) VALUES ('player03', '发财哥')")

    body, cache = await final_results(app_client, contract, cid)
    assert cache == "public, max-age=3600"
    assert (body["kind"], body["state"], body["split"]) == ("red_packet", "sold_out", "random")
    assert (body["won_count"], body["won_fen"], body["count"], body["total_fen"]) == (
        25,
        8_888,
        25,
        8_888,
    )
    # 手气最佳: the largest envelope, the earliest of equals.
    top = max(won.values())
    first_top = next(p for p in players if won.get(p) == top)
    shown = "发财哥" if first_top == "player03" else public_name(first_top)
    assert (body["best"]["name"], body["best"]["amount_fen"]) == (shown, top)
    # The latest 20, latest first, names masked (or the nickname).
    latest = list(reversed(players[:25]))[:20]
    expected = ["发财哥" if p == "player03" else public_name(p) for p in latest]
    assert [w["name"] for w in body["winners"]] == expected
    assert [w["amount_fen"] for w in body["winners"]] == [won[p] for p in latest]
    times = [w["granted_at"] for w in body["winners"]]
    assert all(TIME.fullmatch(t) for t in times)
    assert times == sorted(times, reverse=True)
    assert all("player" not in w["name"] for w in body["winners"])
    # The ledger and Redis agree on the money.
    assert int(await redis.hget(CampaignKeys.of(cid).meta, "won_fen") or 0) == 8_888

    # Final: the worker answers from memory, whatever changes in Redis or PostgreSQL.
    await pg.execute("UPDATE player_names SET nickname = '改名了' WHERE openid = 'player03'")
    multi = await command_calls(redis, "multi")
    again = await asyncio.gather(*(app_client.get(RESULTS.format(id=cid)) for _ in range(100)))
    assert {r.status for r in again} == {200}
    assert {await r.read() for r in again} == {orjson.dumps(body)}
    assert await command_calls(redis, "multi") == multi


async def test_best_luck_ties_go_to_the_earliest(
    app_client: TestClient, contract: Contract
) -> None:
    # Random split with min = max: every envelope 100 fen, so all are tied.
    cid = str(
        (await create_campaign(app_client, total_fen=500, count=5, min_fen=100, max_fen=100))["id"]
    )
    await grab_all(app_client, cid, ["first-1", "second", "third", "fourth", "fifth"])
    body, _ = await final_results(app_client, contract, cid)
    assert body["best"]["name"] == public_name("first-1")
    assert [w["name"] for w in body["winners"]][-1] == public_name("first-1")


async def test_fixed_split_has_no_best_luck(app_client: TestClient, contract: Contract) -> None:
    cid = (await create(app_client, {**RED_PACKET, "split": "fixed", "count": 2, "total_fen": 8}))[
        "id"
    ]
    await grab_all(app_client, cid, ["one", "two"])
    body, _ = await final_results(app_client, contract, cid)
    assert body["best"] is None
    assert [w["amount_fen"] for w in body["winners"]] == [4, 4]
    assert (body["split"], body["won_fen"]) == ("fixed", 8)


async def test_ended_without_winners(app_client: TestClient, contract: Contract) -> None:
    cid = str(
        (
            await create_campaign(
                app_client, starts_at="2001-01-01T00:00:00Z", ends_at="2001-01-02T00:00:00Z"
            )
        )["id"]
    )
    # Final once a drainer has closed it out (its end passed by Redis's clock).
    body, cache = await final_results(app_client, contract, cid, within_s=10)
    assert (body["state"], body["best"], body["winners"], body["won_count"]) == (
        "ended",
        None,
        [],
        0,
    )
    assert cache == "public, max-age=3600"
    scheduled = str((await create_campaign(app_client, starts_at="2999-01-01T00:00:00Z"))["id"])
    assert (await results(app_client, contract, scheduled, 409))[0]["error"] == "not_finished"
    assert (await results(app_client, contract, "nosuch", 404))[0]["error"] == "not_found"


async def test_paused_is_not_finished_an_operators_end_is(
    app_client: TestClient, contract: Contract, redis: Redis
) -> None:
    cid = str((await create_campaign(app_client, total_fen=5_000, count=5))["id"])
    grabbed = await grab_all(app_client, cid, ["early-1", "early-2"])
    resp = await app_client.post(f"/api/admin/campaigns/{cid}/pause", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    await wait_drained(redis, cid)
    assert (await results(app_client, contract, cid, 409))[0]["error"] == "not_finished"
    resp = await app_client.post(f"/api/admin/campaigns/{cid}/end", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    body, _ = await final_results(app_client, contract, cid, within_s=10)
    won = sum(g["amount_fen"] for g in grabbed)
    assert (body["state"], body["won_count"], body["won_fen"]) == ("ended", 2, won)
    assert body["best"]["amount_fen"] == max(g["amount_fen"] for g in grabbed)
    assert [w["name"] for w in body["winners"]] == ["ea***-2", "ea***-1"]


async def test_not_finished_is_asked_once_per_worker_at_a_time(
    own: tuple[TestClient, Redis, Contract],
) -> None:
    app_client, redis, contract = own
    cid = str((await create_campaign(app_client, total_fen=100, count=1))["id"])
    await app_client.get(f"/api/campaigns/{cid}")  # the definition is cached
    multi = await command_calls(redis, "multi")
    answers = await asyncio.gather(*(app_client.get(RESULTS.format(id=cid)) for _ in range(50)))
    assert {r.status for r in answers} == {409}
    # Single flight, then the short negative cache: one MULTI for all of them.
    answers = await asyncio.gather(*(app_client.get(RESULTS.format(id=cid)) for _ in range(50)))
    assert {r.status for r in answers} == {409}
    assert await command_calls(redis, "multi") == multi + 1
    # Sold out, the ledger drains, and within the negative cache's 2 s it is final.
    await grab_all(app_client, cid, ["only"])
    body, _ = await final_results(app_client, contract, cid, within_s=10)
    assert body["winners"] == [
        {"name": "o***", "amount_fen": 100, "granted_at": body["winners"][0]["granted_at"]}
    ]


async def test_results_on_a_redis_cluster(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis
) -> None:
    """The finished check is one MULTI of the campaign's own slot: it runs on a cluster."""
    client = await aiohttp_client(create_app(cluster_settings.with_(ledger=FAST)), headers=PAGE)
    contract = Contract(await (await client.get("/api/openapi.json")).json())
    cid = (await create(client, {**RED_PACKET, "split": "fixed", "count": 4, "total_fen": 400}))[
        "id"
    ]
    assert (await results(client, contract, cid, 409))[0]["error"] == "not_finished"
    await grab_all(client, cid, ["c-one", "c-two", "c-three", "c-four"])
    body, _ = await final_results(client, contract, cid)
    assert (body["state"], body["won_count"], body["won_fen"], body["best"]) == (
        "sold_out",
        4,
        400,
        None,
    )
    assert [w["name"] for w in body["winners"]] == ["c-***ur", "c-***ee", "c-***wo", "c-***ne"]
    ended = str(
        (
            await create_campaign(
                client, starts_at="2001-01-01T00:00:00Z", ends_at="2001-01-02T00:00:00Z"
            )
        )["id"]
    )
    assert (await final_results(client, contract, ended, within_s=10))[0]["state"] == "ended"


# --- Lottery results ---------------------------------------------------------------------


async def test_lottery_results_prize_list_and_latest_winners(
    app_client: TestClient, contract: Contract, redis: Redis
) -> None:
    body = {
        **LOTTERY,
        "name": "财神到",
        "tiers": [
            {"name": "金元宝", "stock": 2, "weight": 1, "value_fen": 88_800},
            {"name": "福袋", "stock": 100, "weight": 0, "value_fen": None},
        ],
        "no_prize_weight": 0,
        "quota_total": 1,
        "quota_daily": None,
        "when_out": "fallback",
    }
    cid = (await create(app_client, body))["id"]
    before, cache = await results(app_client, contract, cid)
    assert cache == "public, max-age=5"
    assert before["prizes"] == [
        {"tier": 0, "name": "金元宝", "value_fen": 88_800, "stock": 2, "won": 0},
        {"tier": 1, "name": "福袋", "value_fen": None, "stock": 100, "won": 0},
    ]
    assert (before["state"], before["winners"], before["won_count"]) == ("open", [], 0)

    players = ["luckyone", "luckytwo", "toolate"]
    tokens = [await login(app_client, p) for p in players]
    app_client.session.cookie_jar.clear()
    drawn = []
    for token in tokens:
        resp = await app_client.post(f"/api/campaigns/{cid}/draw", cookies={"hb_session": token})
        drawn.append((await resp.json())["result"])
    assert drawn == ["prize", "prize", "no_prize"]
    await wait_drained(redis, cid)

    deadline = time.monotonic() + 15
    while True:
        after, _ = await results(app_client, contract, cid)
        if after["won_count"] == 2:
            break
        assert time.monotonic() < deadline, after
        await asyncio.sleep(0.5)
    assert [p["won"] for p in after["prizes"]] == [2, 0]
    assert [(w["name"], w["tier"], w["prize"], w["value_fen"]) for w in after["winners"]] == [
        ("lu***wo", 0, "金元宝", 88_800),
        ("lu***ne", 0, "金元宝", 88_800),
    ]
