"""Session keys from SESSION_KEYS, in process: parsing, key ids, rotation, expiry cap.

What players see of the same rules, through HAProxy, is in tests/test_hostile.py.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.identity.sessions import CLOCK_SLACK_S, Session, SessionStore, issue
from app.local.embedded import EmbeddedRedis
from app.settings import SettingsError, session_keys_from_env
from app.store.scripts import SESSION_SIGNING_KEY, session_key

K1 = bytes(range(32))
K2 = bytes(range(32, 64))


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.fixture
async def redis(private_redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    """A client on a Redis of this test's own."""
    client = Redis.from_url(private_redis_server.url)
    yield client
    await client.aclose()


def test_session_keys_parse_in_order() -> None:
    urlsafe = base64.urlsafe_b64encode(K2).decode().rstrip("=")
    keys = session_keys_from_env({"SESSION_KEYS": f" new:{urlsafe} , old:{_b64(K1)}"})
    assert keys == (("new", K2), ("old", K1))
    assert session_keys_from_env({}) == ()
    assert session_keys_from_env({"SESSION_KEYS": ""}) == ()


@pytest.mark.parametrize(
    "value",
    [
        "k1",
        f":{_b64(K1)}",
        f"k.1:{_b64(K1)}",
        f"{'k' * 17}:{_b64(K1)}",
        "k1:not base64!",
        "k1:<base64 of 32 random bytes>",
        f"k1:{_b64(K1[:15])}",
        f"k1:{_b64(K1)},k1:{_b64(K2)}",
    ],
    ids=[
        "no key",
        "no kid",
        "dot in kid",
        "long kid",
        "bad base64",
        "placeholder",
        "short",
        "twice",
    ],
)
def test_bad_session_keys_refuse_to_start(value: str) -> None:
    with pytest.raises(SettingsError, match="SESSION_KEYS"):
        session_keys_from_env({"SESSION_KEYS": value})


async def test_configured_keys_never_touch_redis_and_rotate(redis: Redis) -> None:
    old_only = SessionStore(redis, 3600, keys=[("k1", K1)])
    old = await old_only.create(Session("rot"))
    assert old.split(".")[4] == "k1"
    assert await redis.get(SESSION_SIGNING_KEY) is None
    both = SessionStore(redis, 3600, keys=[("k2", K2), ("k1", K1)])
    new = await both.create(Session("rot"))
    assert new.split(".")[4] == "k2"
    assert await both.get(old) == Session("rot")
    assert await both.get(new) == Session("rot")
    new_only = SessionStore(redis, 3600, keys=[("k2", K2)])
    assert await new_only.get(old) is None
    assert await new_only.get(new) == Session("rot")
    assert await old_only.get(new) is None
    assert await redis.get(SESSION_SIGNING_KEY) is None


async def test_expiry_is_capped_at_issue_plus_ttl(redis: Redis) -> None:
    store = SessionStore(redis, 3600, keys=[("k1", K1)])
    now = int(time.time())
    for expires, good in [
        (now + 3600, True),
        (now + 3600 + CLOCK_SLACK_S - 5, True),
        (now + 3600 + CLOCK_SLACK_S + 5, False),
        (now + 10 * 365 * 86400, False),
        (now - 1, False),
    ]:
        sid, token = issue(K1, Session("capped"), expires, "k1")
        await redis.set(session_key(sid), Session("capped").to_json(), ex=3600)
        assert (await store.get(token) is not None) is good, expires - now


async def test_a_good_signature_without_a_session_is_refused(redis: Redis) -> None:
    store = SessionStore(redis, 3600, keys=[("k1", K1)])
    _, token = issue(K1, Session("ghost"), int(time.time()) + 60, "k1")
    assert await store.get(token) is None
    # A kid we do not know, whatever its signature.
    sid, stranger = issue(K1, Session("ghost"), int(time.time()) + 60, "k9")
    await redis.set(session_key(sid), Session("ghost").to_json(), ex=3600)
    assert await store.get(stranger) is None


async def test_mint_sessions_signs_with_session_keys(
    redis: Redis, private_redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    out = tmp_path / "sessions.tsv"
    env = {
        **os.environ,
        "REDIS_URL": private_redis_server.url,
        "SESSION_KEYS": f"k2:{_b64(K2)},k1:{_b64(K1)}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "app", "mint-sessions", "--count", "3", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pairs = [line.split("\t") for line in out.read_text().splitlines()]
    assert len(pairs) == 3
    store = SessionStore(redis, 7 * 24 * 3600, keys=[("k2", K2)])
    for openid, token in pairs:
        assert token.split(".")[4] == "k2"
        assert await store.get(token) == Session(openid)
    assert await redis.get(SESSION_SIGNING_KEY) is None
