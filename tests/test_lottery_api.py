"""Lottery campaigns through the HTTP API: definitions, validation, draws under concurrency."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.identity.sessions import Session
from app.settings import LedgerSettings, Settings
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys
from app.web.keys import SESSIONS
from tests.conftest import ADMIN, create_campaign, gather_limited, login

LOTTERY: dict[str, Any] = {
    "kind": "lottery",
    "name": "财神到",
    "starts_at": "2020-02-09T00:00:00+08:00",
    "ends_at": "2999-02-20T00:00:00+08:00",
    "tiers": [
        {
            "name": "金元宝",
            "stock": 10,
            "weight": 1,
            "value_fen": 88_800,
            "schedule": [
                {"at": "2020-02-09T20:00:00+08:00", "release": 5},
                {"at": "2998-02-10T20:00:00+08:00", "release": 5},
            ],
        },
        {"name": "福袋", "stock": 100, "weight": 10, "value_fen": None},
    ],
    "no_prize_weight": 89,
    "quota_total": 3,
    "quota_daily": 1,
}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """These tests read the ledger stream itself, so no in-worker drainer consumes it."""
    return settings.with_(ledger=LedgerSettings(drain_in_worker=False))


async def create_lottery(client: TestClient, **fields: Any) -> dict[str, Any]:
    """POST a lottery and return its JSON (asserting 201)."""
    body = copy.deepcopy(LOTTERY)
    body.update(fields)
    resp = await client.post("/api/admin/campaigns", json=body, headers=ADMIN)
    data = await resp.json()
    assert resp.status == 201, data
    return data  # type: ignore[no-any-return]


async def _draw(client: TestClient, token: str, cid: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post(f"/api/campaigns/{cid}/draw", cookies={"hb_session": token})
    return resp.status, await resp.json()


async def test_create_view_and_stats(client: TestClient, pg: asyncpg.Connection) -> None:
    created = await create_lottery(client)
    cid = created["id"]
    assert created["kind"] == "lottery"
    assert created["state"] == "open"
    assert [(t["stock"], t["released"], t["won"], t["left"]) for t in created["tiers"]] == [
        (10, 5, 0, 5),
        (100, 100, 0, 100),
    ]
    assert (created["fallback"], created["when_out"]) == ("谢谢参与", "renormalise")

    view = await (await client.get(f"/api/campaigns/{cid}")).json()
    assert view["kind"] == "lottery"
    assert view["prizes"] == [
        {"tier": 0, "name": "金元宝", "value_fen": 88_800},
        {"tier": 1, "name": "福袋", "value_fen": None},
    ]
    # Players see prizes, not stock or odds.
    assert "stock" not in str(view)
    assert "weight" not in str(view)

    row = await pg.fetchrow("SELECT kind, total_fen, count, config FROM campaigns WHERE id=$1", cid)
    assert row is not None
    assert (row["kind"], row["total_fen"], row["count"]) == ("lottery", None, None)
    assert '"quota_daily": 1' in row["config"]


async def test_draws_follow_quota_and_are_recorded(client: TestClient, redis: Redis) -> None:
    cid = (await create_lottery(client, quota_daily=None))["id"]
    await login(client, "alice")
    answers = [await client.post(f"/api/campaigns/{cid}/draw") for _ in range(4)]
    bodies = [await r.json() for r in answers]
    assert [r.status for r in answers] == [200, 200, 200, 429]
    assert [b.get("draw_no") for b in bodies[:3]] == [1, 2, 3]
    assert all(b["result"] in {"prize", "no_prize"} for b in bodies[:3])
    assert bodies[3] == {
        "error": "quota_exhausted",
        "message": "you have used all your draws",
        "scope": "total",
    }
    me = await (await client.get(f"/api/campaigns/{cid}/me")).json()
    assert me["draws"] == 3
    won = [b for b in bodies[:3] if b["result"] == "prize"]
    assert me["prizes"] == [{"draw_no": b["draw_no"], **b["prize"]} for b in won]
    entries = await redis.xrange(CampaignKeys.of(cid).ledger)
    assert [e[1][b"n"] for e in entries] == [b"1", b"2", b"3"]
    assert all(e[1][b"k"] == b"draw" and e[1][b"u"] == b"alice" for e in entries)


async def test_daily_quota_answers_scope_daily(client: TestClient) -> None:
    cid = (await create_lottery(client))["id"]
    await login(client, "bob")
    assert (await client.post(f"/api/campaigns/{cid}/draw")).status == 200
    resp = await client.post(f"/api/campaigns/{cid}/draw")
    assert resp.status == 429
    assert (await resp.json())["scope"] == "daily"


async def test_wrong_kind_both_ways(client: TestClient) -> None:
    lottery = (await create_lottery(client))["id"]
    packet = (await create_campaign(client))["id"]
    await login(client, "carol")
    resp = await client.post(f"/api/campaigns/{lottery}/grab")
    assert resp.status == 409
    assert (await resp.json())["error"] == "wrong_kind"
    resp = await client.post(f"/api/campaigns/{packet}/draw")
    assert resp.status == 409
    assert (await resp.json())["error"] == "wrong_kind"
    assert (await (await client.get(f"/api/campaigns/{packet}")).json())["kind"] == "red_packet"


async def test_draw_errors(client: TestClient, redis: Redis) -> None:
    tiers = [{"name": "红包", "stock": 1, "weight": 1, "value_fen": 100}]
    future = (await create_lottery(client, starts_at="2998-01-01T00:00:00Z", tiers=tiers))["id"]
    past = (
        await create_lottery(
            client, starts_at="2001-01-01T00:00:00Z", ends_at="2001-01-02T00:00:00Z", tiers=tiers
        )
    )["id"]
    # Like grabs, the window is answered before the session is looked at.
    resp = await client.post(f"/api/campaigns/{future}/draw")
    assert (resp.status, (await resp.json())["error"]) == (409, "not_started")
    open_now = (await create_lottery(client, tiers=tiers))["id"]
    resp = await client.post(f"/api/campaigns/{open_now}/draw")
    assert (resp.status, (await resp.json())["error"]) == (401, "unauthenticated")
    await login(client, "dave")
    for cid, code in ((future, "not_started"), (past, "ended")):
        resp = await client.post(f"/api/campaigns/{cid}/draw")
        assert resp.status == 409
        assert (await resp.json())["error"] == code
        assert await redis.hlen(CampaignKeys.of(cid).draws) == 0
    for cid, state in ((future, "scheduled"), (past, "ended")):
        assert (await (await client.get(f"/api/campaigns/{cid}")).json())["state"] == state
    resp = await client.post("/api/campaigns/nosuch/draw")
    assert resp.status == 404
    token = await client.app[SESSIONS].create(Session("peeker", snapshot=True))
    status, body = await _draw(client, token, open_now)
    assert (status, body["error"]) == (403, "forbidden")


Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any, *, delete: bool = False) -> Mutation:
    """A mutation setting ``path`` ("tiers.0.stock") to ``value`` (or deleting it)."""

    def mutate(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = body
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        elif delete:
            del node[last]
        else:
            node[last] = value

    return mutate


def _all(*mutations: Mutation) -> Mutation:
    def mutate(body: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(body)

    return mutate


SLOT = "tiers.0.schedule"
BAD_CONFIGS: list[tuple[str, Mutation, str]] = [
    ("negative stock", _set("tiers.1.stock", -1), "tiers[1].stock"),
    ("stock as float", _set("tiers.1.stock", 10.0), "tiers[1].stock"),
    ("negative weight", _set("tiers.0.weight", -1), "tiers[0].weight"),
    ("weight as bool", _set("tiers.0.weight", True), "tiers[0].weight"),
    ("zero prize value", _set("tiers.0.value_fen", 0), "tiers[0].value_fen"),
    ("blank tier name", _set("tiers.1.name", " "), "tiers[1].name"),
    ("unknown tier field", _set("tiers.1.colour", "red"), "tiers[1].colour"),
    ("tier not an object", _set("tiers.1", "福袋"), "tiers[1]"),
    ("no tiers", _set("tiers", []), "tiers"),
    ("tiers not a list", _set("tiers", {"name": "x"}), "tiers"),
    (
        "too many tiers",
        _set("tiers", [{"name": f"t{i}", "stock": 1, "weight": 1} for i in range(33)]),
        "tiers",
    ),
    (
        "zero total weight",
        _all(_set("tiers.0.weight", 0), _set("tiers.1.weight", 0), _set("no_prize_weight", 0)),
        "tiers",
    ),
    ("total weight too large", _set("no_prize_weight", 999_999_999), "tiers"),
    ("negative no-prize weight", _set("no_prize_weight", -5), "no_prize_weight"),
    (
        "unordered slots",
        _set(
            SLOT,
            [
                {"at": "2021-01-02T00:00:00Z", "release": 5},
                {"at": "2021-01-01T00:00:00Z", "release": 5},
            ],
        ),
        "tiers[0].schedule[1].at",
    ),
    (
        "duplicate slot time",
        _set(
            SLOT,
            [
                {"at": "2021-01-01T00:00:00Z", "release": 5},
                {"at": "2021-01-01T08:00:00+08:00", "release": 5},
            ],
        ),
        "tiers[0].schedule[1].at",
    ),
    ("releases short of stock", _set(f"{SLOT}.1.release", 4), "tiers[0].schedule"),
    ("releases beyond stock", _set(f"{SLOT}.1.release", 6), "tiers[0].schedule"),
    ("zero release", _set(f"{SLOT}.0.release", 0), "tiers[0].schedule[0].release"),
    (
        "slot before start",
        _set(f"{SLOT}.0.at", "2020-02-08T23:59:59+08:00"),
        "tiers[0].schedule[0].at",
    ),
    (
        "slot at the end",
        _set(f"{SLOT}.1.at", "2999-02-20T00:00:00+08:00"),
        "tiers[0].schedule[1].at",
    ),
    ("slot without offset", _set(f"{SLOT}.0.at", "2021-01-01T00:00:00"), "tiers[0].schedule[0].at"),
    ("slot without time", _set(f"{SLOT}.0.at", None, delete=True), "tiers[0].schedule[0].at"),
    ("unknown slot field", _set(f"{SLOT}.0.when", "now"), "tiers[0].schedule[0].when"),
    ("empty schedule", _set(SLOT, []), "tiers[0].schedule"),
    ("slot not an object", _set(f"{SLOT}.0", 5), "tiers[0].schedule[0]"),
    ("zero quota", _set("quota_total", 0), "quota_total"),
    ("no quota at all", _all(_set("quota_total", None), _set("quota_daily", None)), "quota_total"),
    ("daily above total", _set("quota_daily", 4), "quota_daily"),
    ("bad when_out", _set("when_out", "random"), "when_out"),
    ("blank fallback", _set("fallback", ""), "fallback"),
    ("end before start", _set("ends_at", "2020-02-08T00:00:00+08:00"), "ends_at"),
    ("red-packet field", _set("total_fen", 100), "total_fen"),
    ("unknown field", _set("budget", 100), "budget"),
    ("unknown kind", _set("kind", "raffle"), "kind"),
]


@pytest.mark.parametrize(
    ("mutate", "field"), [(m, f) for _, m, f in BAD_CONFIGS], ids=[n for n, _, _ in BAD_CONFIGS]
)
async def test_bad_config_is_422_naming_the_field(
    client: TestClient,
    redis: Redis,
    pg: asyncpg.Connection,
    mutate: Mutation,
    field: str,
) -> None:
    body = copy.deepcopy(LOTTERY)
    mutate(body)
    resp = await client.post("/api/admin/campaigns", json=body, headers=ADMIN)
    data = await resp.json()
    assert resp.status == 422, data
    assert data["error"] == "invalid"
    assert data["field"] == field, data
    assert isinstance(data["message"], str)
    assert data["message"]
    assert await redis.scard(CAMPAIGNS_SET) == 0
    assert await pg.fetchval("SELECT count(*) FROM campaigns") == 0


async def test_good_config_variants_are_accepted(client: TestClient) -> None:
    """The mutations above break a body that is itself valid, and null quota_total is allowed."""
    created = await create_lottery(client, quota_total=None, quota_daily=2, fallback="再接再厉")
    assert (created["quota_total"], created["quota_daily"]) == (None, 2)
    assert created["fallback"] == "再接再厉"


async def test_thousands_of_concurrent_draws_never_oversell(
    client: TestClient, redis: Redis
) -> None:
    """1,000 players x 3 concurrent draws, quota 2: exactly 2,000 draws, no tier over stock."""
    cid = (
        await create_lottery(
            client,
            starts_at=None,
            ends_at=None,
            quota_total=2,
            quota_daily=None,
            tiers=[
                {"name": "一等奖", "stock": 5, "weight": 50, "value_fen": 100_000},
                {"name": "二等奖", "stock": 50, "weight": 200, "value_fen": 1_000},
                {"name": "三等奖", "stock": 2_000, "weight": 100, "value_fen": 100},
            ],
            no_prize_weight=650,
        )
    )["id"]
    openids = [f"p{i:04d}" for i in range(1000)]
    tokens = await client.app[SESSIONS].mint(openids)
    attempts = [t for t in tokens for _ in range(3)]
    results = await gather_limited([_draw(client, t, cid) for t in attempts], limit=300)

    statuses = Counter(status for status, _ in results)
    assert statuses == {200: 2000, 429: 1000}
    assert all(b["scope"] == "total" for s, b in results if s == 429)
    won = Counter(b["prize"]["tier"] for s, b in results if s == 200 and b["result"] == "prize")
    keys = CampaignKeys.of(cid)
    counters = {t: int(await redis.hget(keys.tiers, f"won:{t}") or 0) for t in range(3)}
    assert counters == {t: won.get(t, 0) for t in range(3)}
    # Expected demand is ~100 and ~400 draws: the two small tiers are won out exactly.
    assert counters[0] == 5
    assert counters[1] == 50
    assert counters[2] <= 2000
    draws = await redis.hgetall(keys.draws)
    assert len(draws) == 1000
    assert set(draws.values()) == {b"2"}
    entries = await redis.xrange(keys.ledger)
    assert len(entries) == 2000
    assert Counter(int(e[1][b"p"]) for e in entries if e[1][b"p"] != b"-1") == won
    # Every player's ledger records are numbered 1 and 2, once each.
    assert Counter((e[1][b"u"], e[1][b"n"]) for e in entries) == {
        (o.encode(), n): 1 for o in openids for n in (b"1", b"2")
    }
    stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert [t["left"] for t in stats["tiers"]] == [0, 0, 2000 - counters[2]]
    assert stats["draws"] == 2000
    assert list(stats["draws_per_day"].values()) == [2000]
    assert stats["prizes_won"] == sum(counters.values())


async def test_one_player_hammering_gets_exactly_the_quota(
    client: TestClient, redis: Redis
) -> None:
    cid = (await create_lottery(client, quota_total=7, quota_daily=None))["id"]
    token = await login(client, "greedy")
    client.session.cookie_jar.clear()
    results = await asyncio.gather(*(_draw(client, token, cid) for _ in range(60)))
    assert Counter(s for s, _ in results) == {200: 7, 429: 53}
    assert sorted(b["draw_no"] for s, b in results if s == 200) == list(range(1, 8))
    assert await redis.hget(CampaignKeys.of(cid).draws, "greedy") == b"7"
    assert await redis.xlen(CampaignKeys.of(cid).ledger) == 7
