"""Grabs through the HTTP API: exact counts, exact money, one envelope per player."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
from aiohttp import ClientSession, CookieJar
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.scripts import CampaignKeys
from tests.conftest import ADMIN, create_campaign, login


async def _grab_as(client: TestClient, token: str, cid: str) -> dict[str, object]:
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def test_2000_players_500_envelopes(client: TestClient, redis: Redis) -> None:
    campaign = await create_campaign(client, total_fen=888_888, count=500)
    cid = str(campaign["id"])
    tokens = await asyncio.gather(*(login(client, f"p{i:05d}") for i in range(2000)))
    client.session.cookie_jar.clear()
    results = await asyncio.gather(*(_grab_as(client, t, cid) for t in tokens))

    outcomes = Counter(r["result"] for r in results)
    assert outcomes == {"won": 500, "sold_out": 1500}
    won = [r["amount_fen"] for r in results if r["result"] == "won"]
    assert sum(won) == 888_888  # type: ignore[arg-type]
    assert all(isinstance(a, int) and a >= 1 for a in won)
    winners = await redis.hgetall(CampaignKeys.of(cid).winners)
    assert len(winners) == 500
    assert sum(int(v.split(b":")[1]) for v in winners.values()) == 888_888
    # Each envelope went to exactly one player.
    assert len({v.split(b":")[0] for v in winners.values()}) == 500
    assert await redis.llen(CampaignKeys.of(cid).pool) == 0

    stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert stats["won_count"] == 500
    assert stats["won_fen"] == 888_888
    assert stats["remaining_count"] == 0
    assert stats["remaining_fen"] == 0
    assert stats["state"] == "sold_out"


async def test_one_player_50_concurrent_grabs(client: TestClient, redis: Redis) -> None:
    campaign = await create_campaign(client, total_fen=10_000, count=10)
    cid = str(campaign["id"])
    token = await login(client, "greedy")
    client.session.cookie_jar.clear()
    results = await asyncio.gather(*(_grab_as(client, token, cid) for _ in range(50)))

    outcomes = Counter(r["result"] for r in results)
    assert outcomes == {"won": 1, "already_won": 49}
    assert len({r["amount_fen"] for r in results}) == 1
    assert await redis.llen(CampaignKeys.of(cid).pool) == 9
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 1
    me = await (await client.get(f"/api/campaigns/{cid}/me", cookies={"hb_session": token})).json()
    assert me == {"result": "won", "amount_fen": results[0]["amount_fen"]}


async def test_grab_through_two_apps_sharing_redis(
    aiohttp_client,
    settings,
    redis: Redis,  # type: ignore[no-untyped-def]
) -> None:
    """Workers are stateless: two app instances settle one campaign without overselling."""
    from app.factory import create_app

    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    campaign = await create_campaign(a, total_fen=5_000, count=50)
    cid = str(campaign["id"])
    tokens = await asyncio.gather(*(login(a, f"u{i}") for i in range(200)))
    a.session.cookie_jar.clear()
    results = await asyncio.gather(
        *(_grab_as(a if i % 2 else b, t, cid) for i, t in enumerate(tokens))
    )
    won = [r["amount_fen"] for r in results if r["result"] == "won"]
    assert len(won) == 50
    assert sum(won) == 5_000  # type: ignore[arg-type]


async def test_campaign_view_and_me_before_grab(client: TestClient) -> None:
    campaign = await create_campaign(client, total_fen=300, count=3)
    cid = str(campaign["id"])
    view = await (await client.get(f"/api/campaigns/{cid}")).json()
    assert view == {
        "id": cid,
        "name": "新春红包",
        "state": "open",
        "remaining_count": 3,
        "starts_at": None,
        "ends_at": None,
    }
    await login(client, "viewer")
    me = await (await client.get(f"/api/campaigns/{cid}/me")).json()
    assert me == {"result": "none"}


async def test_not_started_and_ended(client: TestClient, redis: Redis) -> None:
    future = await create_campaign(
        client, starts_at="2999-01-01T00:00:00+08:00", ends_at="2999-01-02T00:00:00Z"
    )
    past = await create_campaign(
        client, starts_at="2001-01-01T00:00:00Z", ends_at="2001-01-02T00:00:00Z"
    )
    await login(client, "early")
    resp = await client.post(f"/api/campaigns/{future['id']}/grab")
    assert resp.status == 409
    assert (await resp.json())["error"] == "not_started"
    view = await (await client.get(f"/api/campaigns/{future['id']}")).json()
    assert view["state"] == "scheduled"
    assert view["starts_at"] == "2998-12-31T16:00:00Z"
    resp = await client.post(f"/api/campaigns/{past['id']}/grab")
    assert resp.status == 409
    assert (await resp.json())["error"] == "ended"
    assert (await (await client.get(f"/api/campaigns/{past['id']}")).json())["state"] == "ended"
    for c in (future, past):
        assert await redis.llen(CampaignKeys.of(str(c["id"])).pool) == 100
        assert await redis.hlen(CampaignKeys.of(str(c["id"])).winners) == 0


async def test_campaign_recorded_in_postgres(client: TestClient, pg: asyncpg.Connection) -> None:
    campaign = await create_campaign(client, total_fen=12_345, count=67, min_fen=100, max_fen=300)
    row = await pg.fetchrow("SELECT * FROM campaigns WHERE id = $1", campaign["id"])
    assert row is not None
    assert (row["total_fen"], row["count"], row["min_fen"], row["max_fen"]) == (
        12_345,
        67,
        100,
        300,
    )
    amounts = await pg.fetch(
        "SELECT amount_fen FROM envelopes WHERE campaign_id = $1 ORDER BY seq", campaign["id"]
    )
    assert len(amounts) == 67
    assert sum(r["amount_fen"] for r in amounts) == 12_345
    assert all(100 <= r["amount_fen"] <= 300 for r in amounts)


async def test_logout_ends_session(client: TestClient) -> None:
    campaign = await create_campaign(client, total_fen=100, count=1)
    token = await login(client, "leaver")
    resp = await client.post("/auth/logout")
    assert resp.status == 200
    resp = await client.post(f"/api/campaigns/{campaign['id']}/grab", cookies={"hb_session": token})
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthenticated"


async def test_session_cookie_attributes(client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    resp = await client.post("/auth/dev-login", json={"openid": "cookie-check"})
    header = resp.headers["Set-Cookie"]
    assert "HttpOnly" in header
    assert "SameSite=Lax" in header
    assert "Max-Age=604800" in header
    token = resp.cookies["hb_session"].value
    assert len(token) == 43  # 256 bits, URL-safe base64


async def test_secure_cookie_unless_configured(aiohttp_client, settings) -> None:  # type: ignore[no-untyped-def]
    from app.factory import create_app

    secure = await aiohttp_client(create_app(settings.with_(insecure_cookies=False)))
    resp = await secure.post("/auth/dev-login", json={"openid": "s"})
    assert "Secure" in resp.headers["Set-Cookie"]


async def test_dev_login_absent_unless_enabled(aiohttp_client, settings) -> None:  # type: ignore[no-untyped-def]
    from app.factory import create_app

    prod = await aiohttp_client(create_app(settings.with_(dev_login=False)))
    resp = await prod.post("/auth/dev-login", json={"openid": "x"})
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"


_ = (ClientSession, CookieJar)
