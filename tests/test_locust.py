"""The locust scenario runs headless against a real server and enforces its invariants:
in one process, distributed (a master and two workers), and not at all (web UI closed)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from app.local.embedded import free_port
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


async def _mint(redis_url: str, path: Path, count: int) -> Path:
    """``count`` sessions minted by ``./hb mint-sessions`` into ``path``."""
    mint = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "app", "mint-sessions", "--count", str(count), "--out", str(path)),
        cwd=ROOT,
        env=dict(os.environ, REDIS_URL=redis_url),
    )
    assert await mint.wait() == 0
    return path


async def _server(settings: Settings) -> TestServer:
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return server


async def _create(base: str, total: int, count: int) -> str:
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
    assert "INVARIANT VIOLATED" not in out
    # Both reconcile reports ran (their problems would be violations).
    assert f"campaign {campaign} " in out, out
    assert f"campaign {lottery} " in out, out
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
        sessions = await _mint(redis_url, tmp_path / "sessions.tsv", 60)
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


def _without_hb_env() -> dict[str, str]:
    """This environment without HB_* variables: options come from the command line."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HB_")}


async def _finish(proc: asyncio.subprocess.Process, timeout: float) -> str:
    """Wait for ``proc`` (killed past ``timeout``); its merged output."""
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    return out.decode()


async def test_distributed_run_shares_one_campaign_and_checks_on_the_master(
    settings: Settings, redis: Redis, redis_url: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """A master and two workers on loopback: the master creates one red packet, both
    workers' players grab it with their own half of the sessions, under the opening
    spike shape and only the tagged tasks; the master checks every worker's book."""
    server = await _server(settings)
    files = f"{ROOT / 'loadtest/locustfile.py'},{ROOT / 'loadtest/spike.py'}"
    master_port = free_port()
    env = dict(_without_hb_env(), REDIS_URL=settings.redis_url, DATABASE_URL=settings.database_url)
    workers: list[asyncio.subprocess.Process] = []
    try:
        base = str(server.make_url("")).rstrip("/")
        sessions = await _mint(redis_url, tmp_path / "sessions.tsv", 60)
        lottery = await _create_lottery(base)
        master = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "locust", "-f", files, "--headless", "--only-summary"),
            *("--master", "--master-bind-host", "127.0.0.1"),
            *("--master-bind-port", str(master_port), "--expect-workers", "2"),
            *("--expect-workers-max-wait", "60", "-H", base, "-u", "30"),
            *("--hb-spike-hold", "4", "--hb-spike-tail", "2", "--tags", "view", "grab", "draw"),
            *("--hb-admin-token", ADMIN_TOKEN, "--hb-total-fen", "4321", "--hb-count", "25"),
            *("--hb-lottery", lottery, "--hb-sessions", str(sessions), "--hb-reconcile"),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(2):
            workers.append(
                await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "locust", "-f", files, "--worker"),
                    *("--master-host", "127.0.0.1", "--master-port", str(master_port)),
                    cwd=ROOT,
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
            )
        out = await _finish(master, 120)
        worker_outs = [await _finish(w, 30) for w in workers]
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await server.close()
    assert master.returncode == 0, "\n".join([out, *worker_outs])
    assert "invariants: OK" in out, out
    assert "books of 2 worker(s) merged" in out, out
    # The merged books heard every envelope: both workers' players are in them.
    assert "invariants: 25 wins / 4321 fen heard by players" in out, out
    # The opening spike: all 30 players within the first second, then a tenth, then the end.
    assert "Shape test updating to 30 users at 30.00 spawn rate" in out, out
    assert "Shape test updating to 3 users at 30.00 spawn rate" in out, out
    assert "Shape test completed" in out, out
    assert f"campaign {lottery} " in out, out
    # Only the tagged tasks ran.
    assert "/api/campaigns/[id]/grab" in out
    assert "/api/campaigns/[id]/draw" in out
    assert "/api/campaigns/[id]/me" not in out
    # One campaign, created by the master, grabbed by the players of both workers.
    found = re.findall(r"players grab red packet (\S+)", out)
    assert len(found) == 1, out
    campaign = found[0]
    for worker_out in worker_outs:
        assert re.findall(r"players grab red packet (\S+)", worker_out) == [campaign], worker_out
    # 30 players sold out its 25 envelopes; the money adds up in Redis and PostgreSQL.
    keys = CampaignKeys.of(campaign)
    assert await redis.llen(keys.pool) == 0
    winners = await redis.hgetall(keys.winners)
    assert len(winners) == 25
    assert sum(int(v.split(b":")[1]) for v in winners.values()) == 4321
    count, fen = await pg.fetchrow(
        "SELECT count(*), sum(amount_fen) FROM grabs WHERE campaign_id = $1", campaign
    )
    assert (count, fen) == (25, 4321)
    # Every winner is a minted player (the sessions were split, none ran short).
    minted = {line.split("\t")[0] for line in sessions.read_text().splitlines()}
    assert {k.decode() for k in winners} <= minted


async def test_web_ui_shows_the_options_and_closes_without_a_traceback() -> None:
    """Opened and closed without a test: the options are in the start form, no check
    runs, nothing crashes."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest/locustfile.py")),
        *("--web-host", "127.0.0.1", "--web-port", str(port), "-H", "http://127.0.0.1:9"),
        cwd=ROOT,
        env=_without_hb_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        page = ""
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while not page and time.monotonic() < deadline:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/") as resp:
                        page = await resp.text()
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out = await _finish(proc, 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    start = page.index("window.templateArgs = ") + len("window.templateArgs = ")
    options = json.JSONDecoder().raw_decode(page[start:])[0]["extra_options"]
    assert {
        "hb_admin_token",
        "hb_campaign",
        "hb_lottery",
        "hb_sessions",
        "hb_reconcile",
        "hb_check_players",
    } <= set(options)
    assert options["hb_admin_token"]["is_secret"] is True
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert "invariants: no test ran, nothing to check" in out, out


@pytest.mark.parametrize("workers", [0, 1], ids=["one-process", "master-and-worker"])
async def test_web_ui_run_takes_the_form_options_and_is_checked_when_stopped(
    settings: Settings, redis: Redis, workers: int
) -> None:
    """A test started from the web UI's form (the options filled in there) and stopped
    there, in one process and as a master with a worker: the red packet it created sold
    out, and the check ran on Stop."""
    server = await _server(settings)
    port, master_port = free_port(), free_port()
    locustfile = str(ROOT / "loadtest/locustfile.py")
    distributed = ("--master", "--master-bind-host", "127.0.0.1", "--master-bind-port")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "locust", "-f", locustfile),
        *("--web-host", "127.0.0.1", "--web-port", str(port)),
        *((*distributed, str(master_port)) if workers else ()),
        cwd=ROOT,
        env=_without_hb_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    worker_procs = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "locust", "-f", locustfile, "--worker"),
            *("--master-host", "127.0.0.1", "--master-port", str(master_port)),
            cwd=ROOT,
            env=_without_hb_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(workers)
    ]
    ui = f"http://127.0.0.1:{port}"
    try:
        base = str(server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    async with http.get(f"{ui}/stats/requests") as resp:
                        if len((await resp.json()).get("workers", [])) >= workers:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            form = {
                "user_count": "10",
                "spawn_rate": "10",
                "host": base,
                "hb_admin_token": ADMIN_TOKEN,
                "hb_total_fen": "500",
                "hb_count": "5",
            }
            async with http.post(f"{ui}/swarm", data=form) as resp:
                assert (await resp.json())["success"] is True
            await asyncio.sleep(4)
            async with http.post(f"{ui}/stop") as resp:
                assert (await resp.json())["success"] is True
        proc.send_signal(signal.SIGTERM)
        out = await _finish(proc, 60)
        out += "".join([await _finish(worker, 30) for worker in worker_procs])
    finally:
        for p in [proc, *worker_procs]:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await server.close()
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert "invariants: 5 wins / 500 fen heard by players" in out, out
    assert out.count("invariants: OK") == 1, out
    if workers:
        assert "books of 1 worker(s) merged" in out, out
    # One campaign, the master's, for the worker too.
    campaign = set(re.findall(r"players grab red packet (\S+)", out))
    assert len(campaign) == 1, out
    assert await redis.hlen(CampaignKeys.of(campaign.pop()).winners) == 5
