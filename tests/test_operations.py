"""Operator commands as real processes: `python -m app reconcile|rebuild <campaign>`."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from typing import Any

import asyncpg
from redis.asyncio import Redis

from app.settings import Settings
from app.store.scripts import CampaignKeys
from app.web.factory import create_app
from tests.conftest import ADMIN, PAGE, create_campaign, gather_limited, login
from tests.test_ledger import FAST, MANUAL, grab, grabs_of, wait_drained, winners_of


async def run_cli(settings: Settings, *args: str) -> tuple[int, str]:
    """Run ``python -m app *args`` against the test stores; return (exit code, output)."""
    env = {**os.environ, "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_rebuild_restores_a_lost_campaign(
    aiohttp_client: Any, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = settings.with_(ledger=FAST)
    client = await aiohttp_client(create_app(settings), headers=PAGE)
    campaign = await create_campaign(client, total_fen=50_000, count=200)
    cid = str(campaign["id"])
    first = await asyncio.gather(*(login(client, f"early{i:03d}") for i in range(120)))
    client.session.cookie_jar.clear()
    before = await gather_limited([grab(client, t, cid) for t in first])
    assert Counter(r["result"] for r in before) == {"won": 120}
    await wait_drained(redis, cid)
    winners_before = await winners_of(redis, cid)
    won_fen = sum(a for _, a in winners_before.values())

    # Redis loses the campaign.
    keys = CampaignKeys.of(cid)
    await redis.delete(keys.meta, keys.pool, keys.winners, keys.ledger)
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": first[0]})
    assert resp.status == 404

    code, out = await run_cli(settings, "rebuild", cid)
    assert code == 0, out
    assert "winners         120" in out
    assert await winners_of(redis, cid) == winners_before
    pool = [v.split(b":") for v in await redis.lrange(keys.pool, 0, -1)]
    assert len(pool) == 80
    assert sum(int(a) for _, a in pool) == 50_000 - won_fen
    granted = {s for s, _ in winners_before.values()}
    assert not granted & {int(s) for s, _ in pool}
    assert await redis.hmget(keys.meta, "won_count", "won_fen") == [b"120", str(won_fen).encode()]
    stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert (stats["remaining_count"], stats["remaining_fen"]) == (80, 50_000 - won_fen)

    # A live campaign is never overwritten.
    code, out = await run_cli(settings, "rebuild", cid)
    assert code == 2
    assert "live in Redis" in out

    # Earlier winners keep their envelope; newcomers get only un-granted ones.
    again = await gather_limited([grab(client, t, cid) for t in first[:30]])
    assert all(r["result"] == "already_won" for r in again)
    assert [r["amount_fen"] for r in again] == [r["amount_fen"] for r in before[:30]]
    late = await asyncio.gather(*(login(client, f"late{i:03d}") for i in range(150)))
    client.session.cookie_jar.clear()
    after = await gather_limited([grab(client, t, cid) for t in late])
    assert Counter(r["result"] for r in after) == {"won": 80, "sold_out": 70}
    winners = await winners_of(redis, cid)
    assert len(winners) == 200
    assert len({s for s, _ in winners.values()}) == 200
    assert sum(a for _, a in winners.values()) == 50_000
    await wait_drained(redis, cid)
    assert await grabs_of(pg, cid) == winners

    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 0, out
    assert "result: OK" in out


async def test_reconcile_reports_mismatches(
    aiohttp_client: Any, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = settings.with_(ledger=FAST)
    client = await aiohttp_client(create_app(settings), headers=PAGE)
    campaign = await create_campaign(client, total_fen=10_000, count=40)
    cid = str(campaign["id"])
    tokens = await asyncio.gather(*(login(client, f"r{i:02d}") for i in range(30)))
    client.session.cookie_jar.clear()
    await gather_limited([grab(client, t, cid) for t in tokens])
    await wait_drained(redis, cid)

    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 0, out
    assert "result: OK" in out
    assert "PostgreSQL grabs                  30" in out

    await pg.execute(
        "UPDATE grabs SET amount_fen = amount_fen + 1 WHERE campaign_id = $1 AND openid = 'r03'",
        cid,
    )
    await pg.execute("DELETE FROM grabs WHERE campaign_id = $1 AND openid = 'r07'", cid)
    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 1, out
    assert "result: MISMATCH" in out
    assert "player r03: Redis envelope" in out
    assert "player r07: won envelope" in out
    assert "not in PostgreSQL nor in flight" in out

    code, out = await run_cli(settings, "reconcile", "no-such-campaign")
    assert code == 2
    assert "no campaign" in out


async def test_reconcile_counts_undrained_grants_as_lag_not_mismatch(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    settings = settings.with_(ledger=MANUAL)
    client = await aiohttp_client(create_app(settings), headers=PAGE)
    campaign = await create_campaign(client, total_fen=2_000, count=20)
    cid = str(campaign["id"])
    tokens = await asyncio.gather(*(login(client, f"l{i:02d}") for i in range(12)))
    client.session.cookie_jar.clear()
    await gather_limited([grab(client, t, cid) for t in tokens])

    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 0, out
    assert "ledger lag: 12 stream entries" in out
    assert "in flight (stream only)           12" in out

    # A grant in Redis whose stream entry is gone (lost) is a mismatch.
    await redis.xtrim(CampaignKeys.of(cid).ledger, maxlen=10, approximate=False)
    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 1, out
    assert out.count("not in PostgreSQL nor in flight") == 2


LOTTERY: dict[str, Any] = {
    "kind": "lottery",
    "name": "财神到",
    "tiers": [
        {"name": "金元宝", "stock": 5, "weight": 1, "value_fen": 88_800},
        {"name": "福袋", "stock": 100_000, "weight": 5, "value_fen": None},
        {"name": "8.88元红包", "stock": 100_000, "weight": 10, "value_fen": 888},
    ],
    "no_prize_weight": 4,
    "quota_total": None,
    "quota_daily": 100_000,
}


async def _lottery(client: Any) -> str:
    resp = await client.post("/api/admin/campaigns", json=LOTTERY, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def _draw(client: Any, token: str, cid: str) -> dict[str, Any]:
    resp = await client.post(f"/api/campaigns/{cid}/draw", cookies={"hb_session": token})
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def _players(client: Any, prefix: str, n: int) -> list[str]:
    tokens = await asyncio.gather(*(login(client, f"{prefix}{i:02d}") for i in range(n)))
    client.session.cookie_jar.clear()
    return list(tokens)


async def test_reconcile_lottery_clean_then_tampered(
    aiohttp_client: Any, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = settings.with_(ledger=FAST)
    client = await aiohttp_client(create_app(settings), headers=PAGE)
    cid = await _lottery(client)
    tokens = await _players(client, "d", 30)
    told = await gather_limited([_draw(client, t, cid) for t in tokens for _ in range(3)])
    prizes = sum(r["result"] == "prize" for r in told)
    await wait_drained(redis, cid)

    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 0, out
    assert "lottery  '财神到'" in out
    assert f"PostgreSQL draws                  90{prizes:>10}" in out
    assert "ledger lag: 0 stream entries" in out
    assert "result: OK" in out

    keys = CampaignKeys.of(cid)
    row = await pg.fetchrow(
        "SELECT openid, draw_no FROM draws WHERE campaign_id = $1 AND openid = 'd04' "
        "AND draw_no = 2",
        cid,
    )
    assert row is not None
    await pg.execute(
        "DELETE FROM draws WHERE campaign_id = $1 AND openid = 'd04' AND draw_no = 2", cid
    )
    await redis.hincrby(keys.tiers, "won:1", 1)
    await redis.hincrby(keys.draws, "d09", 1)
    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 1, out
    assert "result: MISMATCH" in out
    assert "player d04: draw(s) 2 of 3 settled in Redis, not in PostgreSQL nor in flight" in out
    assert "tier 1: " in out
    assert "won in Redis" in out
    assert "player d09: draw(s) 4 of 4 settled in Redis, not in PostgreSQL nor in flight" in out


async def test_reconcile_lottery_counts_undrained_draws_as_lag(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    settings = settings.with_(ledger=MANUAL)
    client = await aiohttp_client(create_app(settings), headers=PAGE)
    cid = await _lottery(client)
    tokens = await _players(client, "m", 10)
    await gather_limited([_draw(client, t, cid) for t in tokens for _ in range(2)])
    assert await redis.xlen(CampaignKeys.of(cid).ledger) == 20

    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 0, out
    assert "ledger lag: 20 stream entries" in out
    assert "PostgreSQL draws                   0" in out
    assert "in flight (stream only)           20" in out
    assert "result: OK" in out

    code, out = await run_cli(settings, "rebuild", cid)
    assert code == 2
    assert "only red packets" in out

    # A draw Redis counts whose stream entry is gone (lost) is a mismatch.
    await redis.xtrim(CampaignKeys.of(cid).ledger, maxlen=19, approximate=False)
    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 1, out
    assert out.count("not in PostgreSQL nor in flight") == 1


async def test_reconcile_lottery_while_draws_and_drainer_run(
    aiohttp_client: Any, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = settings.with_(ledger=FAST)
    client = await aiohttp_client(create_app(settings), headers=PAGE)
    cid = await _lottery(client)
    tokens = await _players(client, "live", 40)
    stop = asyncio.Event()
    drawn = 0

    async def keep_drawing() -> None:
        nonlocal drawn
        while not stop.is_set():
            await gather_limited([_draw(client, t, cid) for t in tokens[drawn % 40 :][:20]])
            drawn += 20

    drawer = asyncio.create_task(keep_drawing())
    try:
        outputs = []
        for _ in range(4):
            before = drawn
            code, out = await run_cli(settings, "reconcile", cid)
            assert code == 0, out
            assert drawn > before, "no draw happened while reconcile ran"
            outputs.append(out)
    finally:
        stop.set()
        await drawer
    # The runs saw a growing lottery, some of it in flight.
    assert len(set(outputs)) == 4
    await wait_drained(redis, cid)
    code, out = await run_cli(settings, "reconcile", cid)
    assert code == 0, out
    assert f"PostgreSQL draws          {drawn:>10}" in out
    assert await pg.fetchval("SELECT count(*) FROM draws WHERE campaign_id = $1", cid) == drawn
