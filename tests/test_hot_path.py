"""What the hot path's shortcuts keep: a remembered session token still ends as soon as it
is revoked and at its expiry; a grab answered sold out from memory, with no Redis call,
still refuses revoked, forged and snapshot tokens and tells a winner what it won;
access lines of routine answers are sampled while every error and settlement is
logged, with every field."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time

import orjson
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.identity.sessions import Session, issue
from app.metrics import Pseudonyms
from app.settings import Settings
from app.store.scripts import SESSION_SIGNING_KEY, CampaignKeys, session_key
from app.web.accesslog import AccessLog
from app.web.factory import create_app
from app.web.keys import ACCESS_LOG, SESSIONS
from tests.conftest import (
    GRAB_COMMANDS,
    PAGE,
    command_calls,
    create_campaign,
    login,
    until_answered_locally,
    until_live,
)


async def _me(client: TestClient, token: str, cid: str) -> int:
    resp = await client.get(f"/api/campaigns/{cid}/me", cookies={"hb_session": token})
    return resp.status


async def test_a_remembered_token_ends_when_revoked(client: TestClient, redis: Redis) -> None:
    cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    token = await login(client, "regular")
    other = await login(client, "neighbour")
    client.session.cookie_jar.clear()
    await until_live(client)
    # Verified once, then answered from the worker's memory of verified tokens.
    for _ in range(3):
        assert await _me(client, token, cid) == 200
        assert await _me(client, other, cid) == 200
    await client.app[SESSIONS].delete(token)
    # The revocation takes effect as soon as the event arrives (here, within 5 s).
    deadline = time.monotonic() + 5
    while await _me(client, token, cid) != 401:
        assert time.monotonic() < deadline, "a remembered token outlived its revocation"
        await asyncio.sleep(0.01)
    assert await _me(client, other, cid) == 200
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    assert resp.status == 401
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 0


async def test_a_remembered_token_ends_at_its_expiry(client: TestClient, redis: Redis) -> None:
    cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    await login(client, "first")  # makes the shared signing key
    client.session.cookie_jar.clear()
    await until_live(client)
    key = await redis.get(SESSION_SIGNING_KEY)
    assert isinstance(key, bytes)
    expires = int(time.time()) + 2
    sid, token = issue(key, Session("brief"), expires)
    await redis.set(session_key(sid), Session("brief").to_json(), ex=60)
    assert await _me(client, token, cid) == 200
    assert await _me(client, token, cid) == 200  # remembered
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    assert await _me(client, token, cid) == 401
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    assert resp.status == 401


async def _grab(client: TestClient, token: str, cid: str) -> tuple[int, dict[str, object]]:
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    return resp.status, await resp.json()


async def test_sold_out_from_memory_asks_redis_nothing_and_keeps_every_check(
    client: TestClient, redis: Redis
) -> None:
    cid = str((await create_campaign(client, total_fen=300, count=3))["id"])
    winners = [await login(client, f"winner{i}") for i in range(3)]
    late = [await login(client, f"late{i}") for i in range(20)]
    gone = await login(client, "gone")
    key = await redis.get(SESSION_SIGNING_KEY)
    assert isinstance(key, bytes)
    sid, visitor = issue(key, Session("visitor", snapshot=True), int(time.time()) + 600)
    await redis.set(session_key(sid), Session("visitor", snapshot=True).to_json(), ex=600)
    client.session.cookie_jar.clear()
    await until_live(client)
    won: dict[str, int] = {}
    for token in winners:
        status, body = await _grab(client, token, cid)
        assert (status, body["result"]) == (200, "won")
        won[token] = int(str(body["amount_fen"]))
    assert sum(won.values()) == 300
    await until_answered_locally(lambda: _grab(client, late[0], cid), redis)

    # Tokens this worker has never seen: answered without a single Redis command, not
    # even the session's MGET.
    before = await command_calls(redis, *GRAB_COMMANDS)
    for token in late[1:]:
        assert await _grab(client, token, cid) == (200, {"result": "sold_out"})
    assert await command_calls(redis, *GRAB_COMMANDS) == before

    # Still refused: a forged token, a snapshot-page visitor, a session logged out.
    forged = late[1][:-1] + ("A" if late[1][-1] != "A" else "B")
    assert (await _grab(client, forged, cid))[0] == 401
    status, body = await _grab(client, visitor, cid)
    assert (status, body["error"], body["reason"]) == (403, "forbidden", "snapshot_user")
    await client.app[SESSIONS].delete(gone)
    deadline = time.monotonic() + 5
    while (await _grab(client, gone, cid))[0] != 401:
        assert time.monotonic() < deadline, "a logged-out token kept being answered"
        await asyncio.sleep(0.01)
    # A winner's retry is confirmed and looked up: what it won, once.
    for token, amount in won.items():
        assert await _grab(client, token, cid) == (
            200,
            {"result": "already_won", "amount_fen": amount},
        )
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 3


async def test_routine_answers_are_sampled_errors_and_settlements_all_logged(
    aiohttp_client,  # type: ignore[no-untyped-def]
    settings: Settings,
) -> None:
    out = io.BytesIO()
    app = create_app(settings.with_(access_log_sample=3, log_salt="salt"), AccessLog(out))
    client = await aiohttp_client(app, headers=PAGE)
    cid = str((await create_campaign(client, total_fen=100, count=1))["id"])
    winner = await login(client, "winner")
    losers = [await login(client, f"late-{i}") for i in range(6)]
    client.session.cookie_jar.clear()
    app[ACCESS_LOG].flush()
    out.seek(0)
    out.truncate()

    async def grab(token: str | None) -> dict[str, object]:
        cookies = {} if token is None else {"hb_session": token}
        resp = await client.post(f"/api/campaigns/{cid}/grab", cookies=cookies)
        body: dict[str, object] = await resp.json()
        return body

    assert (await grab(winner))["result"] == "won"
    for token in losers:
        assert (await grab(token))["result"] == "sold_out"
    for _ in range(3):
        assert (await grab(winner))["result"] == "already_won"
    for _ in range(2):
        assert (await grab(None))["error"] == "unauthenticated"
    app[ACCESS_LOG].flush()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    grabs = [line for line in lines if line["route"] == "/api/campaigns/{id}/grab"]
    settled = [line for line in grabs if "sample" not in line and line["status"] == 200]
    sampled = [line for line in grabs if "sample" in line]
    errors = [line for line in grabs if line["status"] == 401]
    # The settlement and every error in full, one in 3 of the 9 routine answers.
    assert len(settled) == 1
    assert settled[0]["user"] == Pseudonyms("salt")("winner")
    assert len(errors) == 2
    assert len(sampled) == 3
    assert all(line["sample"] == 3 and line["status"] == 200 for line in sampled)
    assert len(grabs) == 6
    fields = {"ts", "level", "pid", "request_id", "route", "method", "status", "duration_ms"}
    assert all(fields | {"user"} <= line.keys() for line in grabs)
    assert all(isinstance(line["duration_ms"], float) for line in grabs)


def test_pseudonyms_are_keyed_blake2b_of_the_salt_digest() -> None:
    """The precomputed keyed state gives the documented pseudonym."""
    key = hashlib.sha256(b"pepper").digest()
    for openid in ("a", "wx-openid-secret", "玩家"):
        expected = hashlib.blake2b(openid.encode(), key=key, digest_size=8).hexdigest()
        assert Pseudonyms("pepper")(openid) == expected
