"""What the hot path's shortcuts keep: a remembered session token still ends at once when
revoked and at its expiry, and each player's memo answer is the player's."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.identity.sessions import Session, issue
from app.store.scripts import SESSION_SIGNING_KEY, CampaignKeys, session_key
from app.web.keys import EVENTS, SESSIONS
from tests.conftest import create_campaign, login


async def _live(client: TestClient) -> None:
    deadline = time.monotonic() + 5
    while not client.app[EVENTS].live:
        assert time.monotonic() < deadline, "event listener never went live"
        await asyncio.sleep(0.01)


async def _me(client: TestClient, token: str, cid: str) -> int:
    resp = await client.get(f"/api/campaigns/{cid}/me", cookies={"hb_session": token})
    return resp.status


async def test_a_remembered_token_ends_when_revoked(client: TestClient, redis: Redis) -> None:
    cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    token = await login(client, "regular")
    other = await login(client, "neighbour")
    client.session.cookie_jar.clear()
    await _live(client)
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
    await _live(client)
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
