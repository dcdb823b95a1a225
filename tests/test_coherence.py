"""Workers answer from memory only what they keep coherent: signed sessions, revocations
and sold-out campaigns, across several workers sharing one Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.identity.sessions import Session, SessionStore, issue, sid_of
from app.redpacket.soldout import WinnersIndex
from app.settings import Settings
from app.store.scripts import REVOKED_SET, SESSION_SIGNING_KEY, CampaignKeys, session_key
from app.web.factory import create_app
from app.web.keys import EVENTS
from tests.conftest import (
    GRAB_COMMANDS,
    PAGE,
    command_calls,
    create_campaign,
    login,
    until_answered_locally,
    until_live,
)

Worker = Callable[[], Awaitable[TestClient]]


async def _worker(aiohttp_client, settings: Settings) -> TestClient:  # type: ignore[no-untyped-def]
    client: TestClient = await aiohttp_client(create_app(settings), headers=PAGE)
    return client


async def _grab(worker: TestClient, token: str, cid: str) -> dict[str, object]:
    resp = await worker.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    body: dict[str, object] = await resp.json()
    assert resp.status in (200, 401), body
    return body if resp.status == 200 else {"status": 401, **body}


async def _me(worker: TestClient, token: str, cid: str) -> int:
    resp = await worker.get(f"/api/campaigns/{cid}/me", cookies={"hb_session": token})
    return resp.status


async def test_sold_out_learned_by_every_worker_and_answered_without_redis(
    aiohttp_client, settings: Settings, redis: Redis
) -> None:  # type: ignore[no-untyped-def]
    a = await _worker(aiohttp_client, settings)
    b = await _worker(aiohttp_client, settings)
    await until_live(a, b)
    cid = str((await create_campaign(a, total_fen=1_000, count=3))["id"])
    players = [await login(a, f"p{i}") for i in range(60)]
    a.session.cookie_jar.clear()
    first = [await _grab(a, t, cid) for t in players[:5]]
    assert [r["result"] for r in first] == ["won"] * 3 + ["sold_out"] * 2
    # b never ran the script: it learned from a's announcement.
    scripts_before = await command_calls(redis, "evalsha", "eval")
    await until_answered_locally(lambda: _grab(b, players[10], cid), redis)
    for worker in (a, b):
        await until_answered_locally(lambda w=worker: _grab(w, players[11], cid), redis)  # type: ignore[misc]
    # Each worker asks Redis once whether a session it has not seen yet exists.
    await asyncio.gather(*(_grab(w, t, cid) for w in (a, b) for t in players[5:]))
    before = await command_calls(redis, *GRAB_COMMANDS)
    answers = await asyncio.gather(
        *(_grab(a if i % 2 else b, t, cid) for i, t in enumerate(players[5:]))
    )
    assert all(r == {"result": "sold_out"} for r in answers)
    # 55 losers on two workers, sessions known: no session lookup, no script, no winners
    # lookup.
    assert await command_calls(redis, *GRAB_COMMANDS) == before
    assert await command_calls(redis, "evalsha", "eval") == scripts_before
    # Winners asking again, on either worker, get what they won (confirmed in Redis).
    for worker in (a, b):
        again = [await _grab(worker, t, cid) for t in players[:3]]
        assert again == [
            {"result": "already_won", "amount_fen": r["amount_fen"]} for r in first[:3]
        ]
    won = [int(str(r["amount_fen"])) for r in first[:3]]
    assert sum(won) == 1_000
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 3
    assert await redis.llen(CampaignKeys.of(cid).pool) == 0


async def test_logout_on_one_worker_ends_the_session_on_all(
    aiohttp_client, settings: Settings, redis: Redis
) -> None:  # type: ignore[no-untyped-def]
    a = await _worker(aiohttp_client, settings)
    b = await _worker(aiohttp_client, settings)
    await until_live(a, b)
    cid = str((await create_campaign(a, total_fen=1_000, count=10))["id"])
    token = await login(a, "leaver")
    a.session.cookie_jar.clear()
    assert await _me(b, token, cid) == 200
    resp = await a.post("/auth/logout", cookies={"hb_session": token})
    assert resp.status == 200
    sid = sid_of(token)
    assert await redis.get(session_key(sid)) is None
    assert await redis.zscore(REVOKED_SET, sid) is not None
    deadline = time.monotonic() + 5
    while await _me(b, token, cid) != 401:
        assert time.monotonic() < deadline, "b kept accepting a revoked token"
        await asyncio.sleep(0.01)
    assert await _me(a, token, cid) == 401
    # A worker started after the logout learns it from Redis when it subscribes.
    c = await _worker(aiohttp_client, settings)
    await until_live(c)
    assert (await _grab(c, token, cid))["status"] == 401
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 0


async def test_forged_tampered_and_expired_tokens_refused(client: TestClient, redis: Redis) -> None:
    cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    token = await login(client, "honest")
    client.session.cookie_jar.clear()
    await until_live(client)
    assert (await _grab(client, token, cid))["result"] == "won"
    key = await redis.get(SESSION_SIGNING_KEY)
    assert key is not None
    assert len(key) == 32
    sid, expires, snapshot, _, kid, mac = token.split(".")
    other = issue(key, Session("other"), int(time.time()) + 3600)[1].split(".")[3]
    past = int(time.time()) - 1
    refused = [
        ".".join([sid, expires, snapshot, other, kid, mac]),  # someone else's openid
        ".".join([sid, str(int(expires) + 10**6), snapshot, token.split(".")[3], kid, mac]),
        issue(key, Session("late"), past)[1],  # our key, expired
        issue(b"k" * 32, Session("forger"), int(time.time()) + 3600)[1],  # another key
    ]
    for bad in refused:
        answer = await _grab(client, bad, cid)
        assert answer == {
            "status": 401,
            "error": "unauthenticated",
            "message": "session unknown or expired; log in again",
        }
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 1
    assert await redis.xlen(CampaignKeys.of(cid).ledger) <= 1


async def test_store_without_events_asks_redis(redis: Redis, settings: Settings) -> None:
    """A store that listens to no events (a CLI) checks every session in Redis."""
    listening, deaf = SessionStore(redis, 3600), SessionStore(redis, 3600)
    token = await listening.create(Session("quiet"))
    assert await deaf.get(token) == Session("quiet")
    await listening.delete(token)
    assert await deaf.get(token) is None


async def test_signing_key_lost_from_redis_is_replaced_everywhere(
    aiohttp_client, settings: Settings, redis: Redis
) -> None:  # type: ignore[no-untyped-def]
    a = await _worker(aiohttp_client, settings)
    cid = str((await create_campaign(a, total_fen=1_000, count=10))["id"])
    assert await _me(a, await login(a, "before"), cid) == 200
    await redis.delete(SESSION_SIGNING_KEY)
    fresh = SessionStore(redis, 3600)  # another worker, after the loss
    token = await fresh.create(Session("after"))
    a.session.cookie_jar.clear()
    # a re-reads the key (at most once a second) when a signature fails.
    deadline = time.monotonic() + 5
    while await _me(a, token, cid) != 200:
        assert time.monotonic() < deadline, "a never picked up the new key"
        await asyncio.sleep(0.1)


async def test_winners_index_is_exact_for_winners(redis: Redis) -> None:
    key = CampaignKeys.of("idx").winners
    winners = {f"w{i:05d}": f"{i}:{i + 1}" for i in range(25_000)}
    await redis.hset(key, mapping=winners)
    index = await WinnersIndex.load(redis, "idx")
    assert len(index) == len(winners)
    assert all(w in index for w in winners)
    # A Bloom filter: a non-winner is a (confirmed in Redis) hit about 0.5 % of the time.
    false_hits = sum(f"l{i:05d}" in index for i in range(25_000))
    assert false_hits < 25_000 * 0.01


async def test_session_cookie_found_among_others(client: TestClient, redis: Redis) -> None:
    cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    token = await login(client, "crowded")
    client.session.cookie_jar.clear()
    url = f"/api/campaigns/{cid}/me"
    for header, status in [
        (f"a=1; hb_session={token}; b=2", 200),
        (f"hb_session={token};x=y", 200),
        (f"  hb_session={token}", 200),
        (f"hb_session={token}; hb_session=stale", 400),
        (f"hb_session=stale; hb_session={token}", 400),
        (f'hb_session="{token}"', 401),
        (f"xhb_session={token}", 401),
        ("hb_session", 401),
        ("hb_session=", 401),
        (";;;", 401),
    ]:
        resp = await client.get(url, headers={"Cookie": header})
        assert resp.status == status, header
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 0


async def test_listener_resyncs_what_it_missed_while_disconnected(
    aiohttp_client, settings: Settings, redis: Redis
) -> None:  # type: ignore[no-untyped-def]
    a = await _worker(aiohttp_client, settings)
    await until_live(a)
    cid = str((await create_campaign(a, total_fen=1_000, count=10))["id"])
    token = await login(a, "missed")
    a.session.cookie_jar.clear()
    assert await _me(a, token, cid) == 200
    await redis.client_kill_filter(_type="pubsub")
    deadline = time.monotonic() + 5
    while a.app[EVENTS].live:
        assert time.monotonic() < deadline, "the listener did not notice the lost connection"
        await asyncio.sleep(0.001)
    assert "hongbao_events_live 0.0" in await (await a.get("/metrics")).text()
    # Revoked while a is not subscribed: the published message never reaches it.
    await SessionStore(redis, settings.session_ttl_s).delete(token)
    await until_live(a)
    assert "hongbao_events_live 1.0" in await (await a.get("/metrics")).text()
    # Live again, a trusts its memory, which the resync rebuilt from hb:revoked.
    assert await _me(a, token, cid) == 401
