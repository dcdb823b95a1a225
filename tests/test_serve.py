"""The one-command run from nothing, and the bulk session CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.local.embedded import free_port
from app.store.scripts import CampaignKeys
from tests.conftest import PAGE, create_campaign

ROOT = Path(__file__).resolve().parent.parent


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "serve exited during start-up"
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout}s")


@pytest.mark.slow
async def test_serve_from_nothing_grabs_and_stops(tmp_path: Path) -> None:
    port, redis_port, pg_port = free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "DATABASE_URL", "ADMIN_TOKEN", "DEV_LOGIN"}
    }
    env.update(EMBEDDED_REDIS_PORT=str(redis_port), EMBEDDED_PG_PORT=str(pg_port))
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await _wait_http(f"{base}/readyz", proc)
        token = (data_dir / "admin-token").read_text().strip()
        # unsafe=True: keep cookies for an IP-address host.
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=PAGE
        ) as http:
            async with http.post(
                f"{base}/api/admin/campaigns",
                json={"kind": "red_packet", "name": "冒烟", "total_fen": 1_000, "count": 3},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 201
                cid = (await resp.json())["id"]
            async with http.post(f"{base}/auth/dev-login", json={"openid": "first"}) as resp:
                assert resp.status == 200
            async with http.post(f"{base}/api/campaigns/{cid}/grab") as resp:
                grab = await resp.json()
            async with http.get(f"{base}/api/campaigns/{cid}/me") as resp:
                me = await resp.json()
        assert grab["result"] == "won"
        assert 1 <= grab["amount_fen"] <= 1_000
        assert me == {"result": "won", "amount_fen": grab["amount_fen"]}
        assert _port_open(redis_port)
        assert _port_open(pg_port)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=90)[0].decode()
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}/" in output
    assert "hongbao: stopped" in output
    # Everything it started is gone.
    assert not _port_open(port)
    assert not _port_open(redis_port)
    assert not _port_open(pg_port)
    # The embedded Redis ran with an AOF.
    assert list((data_dir / "redis").glob("appendonly.aof*"))


async def test_mint_sessions_cli(client: TestClient, redis_url: str, tmp_path: Path) -> None:
    campaign = await create_campaign(client, total_fen=2_000, count=20)
    out = tmp_path / "sessions.tsv"
    env = dict(os.environ, REDIS_URL=redis_url)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "mint-sessions",
            "--count",
            "30",
            "--out",
            str(out),
            "--prefix",
            "bulk-",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert len(rows) == 30
    assert len({token for _, token in rows}) == 30
    client.session.cookie_jar.clear()
    results = []
    for openid, token in rows:
        resp = await client.post(
            f"/api/campaigns/{campaign['id']}/grab", cookies={"hb_session": token}
        )
        assert resp.status == 200, openid
        results.append(await resp.json())
    won = [r["amount_fen"] for r in results if r["result"] == "won"]
    assert len(won) == 20
    assert sum(won) == 2_000


async def test_create_campaign_cli_shows_progress_and_loads_exactly(
    redis_url: str, database_url: str, clean: None
) -> None:
    env = dict(os.environ, REDIS_URL=redis_url, DATABASE_URL=database_url)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "create-campaign",
            "--name",
            "大红包",
            "--total-fen",
            "1234567",
            "--count",
            "250000",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "250,000/250,000 (100%" in proc.stderr
    stats = orjson.loads(proc.stdout)
    assert (stats["count"], stats["remaining_count"], stats["remaining_fen"]) == (
        250_000,
        250_000,
        1_234_567,
    )
    redis = Redis.from_url(redis_url)
    try:
        pool = await redis.lrange(CampaignKeys.of(stats["id"]).pool, 0, -1)
    finally:
        await redis.aclose()
    assert len(pool) == 250_000
    assert sum(int(e.split(b":")[1]) for e in pool) == 1_234_567
    assert len({e.split(b":")[0] for e in pool}) == 250_000
    conn = await asyncpg.connect(database_url)
    try:
        total = await conn.fetchval(
            "SELECT sum(amount_fen) FROM envelopes WHERE campaign_id = $1", stats["id"]
        )
    finally:
        await conn.close()
    assert total == 1_234_567

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "create-campaign",
            "--name",
            "x",
            "--total-fen",
            "5",
            "--count",
            "10",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "total_fen" in bad.stderr
