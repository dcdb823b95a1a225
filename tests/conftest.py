"""Shared fixtures: real Redis and PostgreSQL, cleaned per test.

TEST_REDIS_URL / TEST_DATABASE_URL choose the servers. Unset, the suite uses the
machine's Redis (db 15) and PostgreSQL (database ``test``) on their standard ports
when they answer, and otherwise starts embedded ones (the same binaries
``./hb serve`` uses) for the whole session.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from redis.asyncio import Redis

from app.local.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from app.settings import Settings
from app.web.factory import create_app
from app.web.keys import EVENTS
from app.web.lifecycle import JsonErrorRunner

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The header the H5 page sends on every request: it passes the CSRF same-origin check.
PAGE = {"X-Requested-With": "hongbao"}


def worker_env(redis_url: str, database_url: str, port: int, **extra: str) -> dict[str, str]:
    """The environment of a real worker process (``python -m app worker``) on ``port``
    against the test stores, with dev-login and plain-HTTP cookies; ``extra`` on top."""
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DEV_LOGIN": "1",
        "INSECURE_COOKIES": "1",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        **extra,
    }


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis database the tests may FLUSHDB."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
    elif _answers(6379):
        yield "redis://127.0.0.1:6379/15"
    else:
        server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), free_port()).start()
        yield server.url
        server.stop()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL database whose public schema the tests may drop."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
    elif _answers(5432):
        yield "postgresql://postgres@127.0.0.1:5432/test"
    else:
        server = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")), free_port()).start()
        yield server.url
        server.stop()


async def reset_stores(redis_url: str, database_url: str) -> None:
    """Empty the test Redis database and PostgreSQL schema."""
    redis = Redis.from_url(redis_url)
    await redis.flushdb()
    await redis.aclose()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


@pytest.fixture
async def clean(redis_url: str, database_url: str) -> None:
    """Start each test from empty stores."""
    await reset_stores(redis_url, database_url)


@pytest.fixture
def settings(redis_url: str, database_url: str, clean: None) -> Settings:
    """Settings for an in-process app against the test stores."""
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        dev_login=True,
        insecure_cookies=True,
    )


@pytest.fixture
async def redis(redis_url: str, clean: None) -> AsyncIterator[Redis]:
    """A client on the test Redis database, for asserting end state."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis server of the test's own: its command counters see nobody else, and the
    test may stop, restart or password-protect it."""
    server = EmbeddedRedis(tmp_path / "redis", free_port()).start()
    yield server
    server.stop()


@pytest.fixture
async def pg(database_url: str, clean: None) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, for asserting end state."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


class WorkerTestServer(TestServer):
    """A test server serving as a worker does (app.web.lifecycle.JsonErrorRunner): the
    hot routes below the Application, protocol errors in JSON."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return JsonErrorRunner(self.app, **kwargs)


@pytest.fixture
async def client(aiohttp_client, settings: Settings) -> TestClient:  # type: ignore[no-untyped-def]
    """An HTTP client on an in-process app served as a worker serves it, sending what
    the H5 page sends."""
    return await aiohttp_client(WorkerTestServer(create_app(settings)), headers=PAGE)


async def create_campaign(client: TestClient, **fields: object) -> dict[str, object]:
    """POST a red-packet campaign and return its JSON (asserting 201)."""
    body = {"kind": "red_packet", "name": "新春红包", "total_fen": 100_000, "count": 100}
    body.update(fields)
    resp = await client.post("/api/admin/campaigns", json=body, headers=ADMIN)
    data = await resp.json()
    assert resp.status == 201, data
    return data  # type: ignore[no-any-return]


async def login(client: TestClient, openid: str) -> str:
    """dev-login as ``openid``; return the session cookie value."""
    resp = await client.post("/auth/dev-login", json={"openid": openid})
    assert resp.status == 200, await resp.text()
    return resp.cookies["hb_session"].value


def gather_limited(coros: list, limit: int = 200):  # type: ignore[no-untyped-def,type-arg]
    """asyncio.gather with at most ``limit`` running at once."""
    sem = asyncio.Semaphore(limit)

    async def one(coro):  # type: ignore[no-untyped-def]
        async with sem:
            return await coro

    return asyncio.gather(*(one(c) for c in coros))


async def command_calls(redis: Redis, *commands: str) -> int:
    """How many times the server has run ``commands`` (INFO commandstats), all clients."""
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)


# Every command a grab may send to Redis, for tests that a path sends none.
GRAB_COMMANDS = ("evalsha", "eval", "hmget", "hget", "mget", "get", "hgetall", "hscan")


async def until_live(*clients: TestClient, within_s: float = 5.0) -> None:
    """Wait (bounded) until every client's app has its event listener subscribed and
    resynced (its memory of revocations and sold-out campaigns is then trusted)."""
    deadline = time.monotonic() + within_s
    while not all(c.app[EVENTS].live for c in clients):
        assert time.monotonic() < deadline, "event listener never went live"
        await asyncio.sleep(0.01)


async def until_answered_locally(answer: Callable[[], Awaitable[object]], redis: Redis) -> None:
    """Repeat ``answer()`` until one call sends no grab command to Redis (bounded: 5 s);
    a worker learns a campaign is sold out asynchronously."""
    deadline = time.monotonic() + 5
    while True:
        before = await command_calls(redis, *GRAB_COMMANDS)
        await answer()
        if await command_calls(redis, *GRAB_COMMANDS) == before:
            return
        assert time.monotonic() < deadline, "the worker kept asking Redis"
        await asyncio.sleep(0.02)
