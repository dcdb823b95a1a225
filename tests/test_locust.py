"""The locust scenario runs headless against a real server and enforces its invariants."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from app.factory import create_app
from app.scripts import CampaignKeys
from app.settings import Settings
from tests.conftest import ADMIN_TOKEN

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


async def _run_locust(base: str, campaign: str, sessions: Path | None) -> tuple[int, str]:
    env = dict(os.environ, HB_ADMIN_TOKEN=ADMIN_TOKEN, HB_CAMPAIGN=campaign)
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


async def test_locust_run_passes_invariants(settings: Settings, redis: Redis) -> None:
    server = await _server(settings)
    try:
        base = str(server.make_url("")).rstrip("/")
        campaign = await _create(base, 12_345, 25)
        code, out = await _run_locust(base, campaign, None)
    finally:
        await server.close()
    assert code == 0, out
    assert "invariants: OK" in out
    # The 40 players sold the campaign out; what they heard is what Redis holds.
    assert await redis.llen(CampaignKeys.of(campaign).pool) == 0
    assert await redis.hlen(CampaignKeys.of(campaign).winners) == 25


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
        # Books cooked behind the service's back: a fen appears from nowhere.
        await redis.hincrby(CampaignKeys.of(campaign).meta, "won_fen", 1)
        code, out = await _run_locust(base, campaign, sessions)
    finally:
        await server.close()
    assert code == 1, out
    assert "INVARIANT VIOLATED" in out
