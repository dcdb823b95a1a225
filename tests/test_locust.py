"""The locust scenario runs headless against a real server and enforces its invariants."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from app.settings import Settings
from app.store.scripts import CampaignKeys
from app.web.factory import create_app
from tests.conftest import ADMIN_TOKEN

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


async def _run_locust(
    base: str, campaign: str, sessions: Path | None, **extra: str
) -> tuple[int, str]:
    env = dict(os.environ, HB_ADMIN_TOKEN=ADMIN_TOKEN, HB_CAMPAIGN=campaign, **extra)
    if sessions is not None:
        env["HB_SESSIONS"] = str(sessions)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest/locustfile.py"),
        "--headless",
        "-H",
        base,
        "-u",
        "40",
        "-r",
        "40",
        "-t",
        "6s",
        "--only-summary",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _server(settings: Settings) -> TestServer:
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return server


async def _create(base: str, total: int, count: int) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/api/admin/campaigns",
            json={"kind": "red_packet", "name": "locust", "total_fen": total, "count": count},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp,
    ):
        assert resp.status == 201
        return str((await resp.json())["id"])


LOTTERY = {
    "kind": "lottery",
    "name": "locust 抽奖",
    "tiers": [
        {"name": "金元宝", "stock": 3, "weight": 1, "value_fen": 88_800},
        {"name": "福袋", "stock": 1_000, "weight": 5, "value_fen": None},
    ],
    "no_prize_weight": 4,
    "quota_total": 5,
    "quota_daily": 3,
}


async def _create_lottery(base: str) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/api/admin/campaigns",
            json=LOTTERY,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp,
    ):
        assert resp.status == 201
        return str((await resp.json())["id"])


async def test_locust_run_passes_invariants(
    settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    server = await _server(settings)
    try:
        base = str(server.make_url("")).rstrip("/")
        campaign = await _create(base, 12_345, 25)
        lottery = await _create_lottery(base)
        code, out = await _run_locust(
            base,
            campaign,
            None,
            HB_LOTTERY=lottery,
            HB_RECONCILE="1",
            REDIS_URL=settings.redis_url,
            DATABASE_URL=settings.database_url,
        )
    finally:
        await server.close()
    assert code == 0, out
    assert "invariants: OK" in out
    assert out.count("result: OK") == 2, out
    # The 40 players sold the campaign out; what they heard is what Redis holds.
    assert await redis.llen(CampaignKeys.of(campaign).pool) == 0
    assert await redis.hlen(CampaignKeys.of(campaign).winners) == 25
    # They drew too, within their quotas, and every draw reached PostgreSQL.
    raw = await redis.hgetall(CampaignKeys.of(lottery).draws)
    draws = {k.decode(): int(v) for k, v in raw.items()}
    assert draws
    assert max(draws.values()) <= 3
    rows = await pg.fetchval("SELECT count(*) FROM draws WHERE campaign_id = $1", lottery)
    assert rows == sum(draws.values())
    assert int(await redis.hget(CampaignKeys.of(lottery).tiers, "won:0") or 0) <= 3


async def test_locust_fails_on_a_broken_invariant(
    settings: Settings, redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    server = await _server(settings)
    try:
        base = str(server.make_url("")).rstrip("/")
        campaign = await _create(base, 10_000, 100)
        # Bulk sessions, as a big run would use them.
        sessions = tmp_path / "sessions.tsv"
        mint = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "mint-sessions",
            "--count",
            "60",
            "--out",
            str(sessions),
            cwd=ROOT,
            env=dict(os.environ, REDIS_URL=redis_url),
        )
        assert await mint.wait() == 0
        # Books cooked behind the service's back: a fen appears from nowhere, and a
        # lottery tier says it gave out more gold than it had.
        await redis.hincrby(CampaignKeys.of(campaign).meta, "won_fen", 1)
        lottery = await _create_lottery(base)
        await redis.hincrby(CampaignKeys.of(lottery).tiers, "won:0", 4)
        code, out = await _run_locust(base, campaign, sessions, HB_LOTTERY=lottery)
    finally:
        await server.close()
    assert code == 1, out
    assert "INVARIANT VIOLATED: no request failed, yet service says" in out
    assert "INVARIANT VIOLATED: tier 0: " in out
    assert ", stock 3, released 3" in out
