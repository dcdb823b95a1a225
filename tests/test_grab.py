"""Grabs through the HTTP API: exact counts, exact money, one envelope per player."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.background.events import publish
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN, PAGE, create_campaign, login, until_answered_locally


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
    from app.web.factory import create_app

    a = await aiohttp_client(create_app(settings), headers=PAGE)
    b = await aiohttp_client(create_app(settings), headers=PAGE)
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
        "kind": "red_packet",
        "name": "新春红包",
        "state": "open",
        "remaining_count": 3,
        "split": "random",
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
    definition = (row["total_fen"], row["count"], row["min_fen"], row["max_fen"])
    assert definition == (12_345, 67, 100, 300)
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
    sid, expires, snapshot, openid, kid, mac = token.split(".")
    assert kid == "r"  # the Redis-shared key: no SESSION_KEYS in tests
    assert len(sid) == 22  # 128 random bits, URL-safe base64
    assert len(mac) == 22  # 128 bits of HMAC-SHA256
    assert (snapshot, openid) == ("0", "Y29va2llLWNoZWNr")  # base64url("cookie-check")
    assert abs(int(expires) - time.time() - 604800) <= 5


async def test_secure_cookie_unless_configured(aiohttp_client, settings) -> None:  # type: ignore[no-untyped-def]
    from app.web.factory import create_app

    secure = await aiohttp_client(create_app(settings.with_(insecure_cookies=False)), headers=PAGE)
    resp = await secure.post("/auth/dev-login", json={"openid": "s"})
    assert "Secure" in resp.headers["Set-Cookie"]


async def test_dev_login_absent_unless_enabled(aiohttp_client, settings) -> None:  # type: ignore[no-untyped-def]
    from app.web.factory import create_app

    prod = await aiohttp_client(create_app(settings.with_(dev_login=False)))
    resp = await prod.post("/auth/dev-login", json={"openid": "x"})
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"


async def test_sold_out_path_still_answers_winners(client: TestClient, redis: Redis) -> None:
    campaign = await create_campaign(client, total_fen=600, count=3)
    cid = str(campaign["id"])
    tokens = [await login(client, f"s{i}") for i in range(6)]
    client.session.cookie_jar.clear()
    first = [await _grab_as(client, t, cid) for t in tokens]
    assert [r["result"] for r in first] == ["won"] * 3 + ["sold_out"] * 3
    # The worker now knows the campaign is sold out; retries take the lookup path.
    again = await asyncio.gather(*(_grab_as(client, t, cid) for t in tokens * 3))
    for i, result in enumerate(again):
        original = first[i % 6]
        if original["result"] == "won":
            assert result == {"result": "already_won", "amount_fen": original["amount_fen"]}
        else:
            assert result == {"result": "sold_out"}
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 3
    assert await redis.xlen(CampaignKeys.of(cid).ledger) == 3


async def test_sold_out_knowledge_ends_with_a_reset(client: TestClient, redis: Redis) -> None:
    """A refilled pool (rebuild publishes "reset") is grabbed again: sold out is not forever."""
    campaign = await create_campaign(client, total_fen=100, count=1)
    cid = str(campaign["id"])
    a, b = await login(client, "ra"), await login(client, "rb")
    client.session.cookie_jar.clear()
    assert (await _grab_as(client, a, cid))["result"] == "won"
    assert (await _grab_as(client, b, cid))["result"] == "sold_out"
    await until_answered_locally(lambda: _grab_as(client, b, cid), redis)
    await redis.rpush(CampaignKeys.of(cid).pool, "1:50")
    assert (await _grab_as(client, b, cid))["result"] == "sold_out"
    await publish(redis, "reset", cid)
    deadline = time.monotonic() + 5
    while (answer := await _grab_as(client, b, cid))["result"] == "sold_out":
        assert time.monotonic() < deadline, "the reset never reached the worker"
        await asyncio.sleep(0.02)
    assert answer == {"result": "won", "amount_fen": 50}
