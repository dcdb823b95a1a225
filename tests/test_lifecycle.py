"""Pause, resume and end through the API, and the close-out: real Redis and PostgreSQL.

Invariants: nothing is granted while paused or after the end; grants + the close-out's
refund == the budget exactly, however grabs race the end; exactly one close-out record
reaches PostgreSQL, however many workers end and drainers close out; reconcile checks
it; a rebuild after Redis lost the campaign keeps it paused, ended and closed out.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.background.drainer import REFRESH_S, Drainer
from app.campaigns import operations
from app.local.embedded import EmbeddedPostgres, free_port
from app.model import from_datetime, iso
from app.settings import LedgerSettings, Settings
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys, Scripts
from app.web.factory import create_app
from app.web.keys import EVENTS, PG, REDIS
from tests.conftest import ADMIN, PAGE, create_campaign, gather_limited, login, until_live
from tests.test_lottery_api import create_lottery

MANUAL = LedgerSettings(drain_in_worker=False, block_ms=50, claim_idle_ms=200)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The tests drain with drainers of their own, when they choose."""
    return settings.with_(ledger=MANUAL)


async def admin(client: TestClient, cid: str, action: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post(f"/api/admin/campaigns/{cid}/{action}", headers=ADMIN)
    return resp.status, await resp.json()


async def stats(client: TestClient, cid: str) -> dict[str, Any]:
    resp = await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def grab(client: TestClient, token: str, cid: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    return resp.status, await resp.json()


async def view_state(client: TestClient, cid: str) -> str:
    resp = await client.get(f"/api/campaigns/{cid}")
    return str((await resp.json())["state"])


async def drain(client: TestClient, consumers: int = 1) -> None:
    """Drain every stream with ``consumers`` drainers racing, until nothing is left."""
    redis, pg = client.app[REDIS], client.app[PG]
    drainers = [Drainer(redis, pg, MANUAL, f"test-{i}") for i in range(consumers)]
    for _ in range(50):
        done = await asyncio.gather(*(d.step() for d in drainers))
        if not any(done):
            return
    raise AssertionError("the streams never drained")


async def test_pause_resume_end_answers_and_idempotency(client: TestClient) -> None:
    cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    token = await login(client, "alice")
    client.session.cookie_jar.clear()
    await until_live(client)

    status, paused = await admin(client, cid, "pause")
    assert (status, paused["state"]) == (200, "paused")
    assert (await admin(client, cid, "pause")) == (200, paused)
    assert await grab(client, token, cid) == (
        409,
        {"error": "paused", "message": "the campaign is paused; try again later"},
    )
    assert await view_state(client, cid) == "paused"
    assert (await stats(client, cid))["won_count"] == 0

    status, resumed = await admin(client, cid, "resume")
    assert (status, resumed["state"]) == (200, "open")
    assert (await admin(client, cid, "resume")) == (200, resumed)
    status, won = await grab(client, token, cid)
    assert (status, won["result"]) == (200, "won")
    assert await view_state(client, cid) == "open"

    status, ended = await admin(client, cid, "end")
    assert status == 200
    assert ended["state"] == "ended"
    assert (ended["won_count"], ended["refunded_count"]) == (1, 9)
    assert ended["won_fen"] + ended["refunded_fen"] == 1_000
    assert (await admin(client, cid, "end")) == (200, ended)
    for action in ("pause", "resume"):
        status, body = await admin(client, cid, action)
        assert (status, body["error"]) == (409, "ended")
    other = await login(client, "bob")
    client.session.cookie_jar.clear()
    assert (await grab(client, other, cid))[1]["error"] == "ended"
    assert await view_state(client, cid) == "ended"
    assert await stats(client, cid) == ended

    for action in ("end", "pause", "resume"):
        status, body = await admin(client, "0123456789abcdef", action)
        assert (status, body["error"]) == (404, "not_found")
        resp = await client.post(f"/api/admin/campaigns/{cid}/{action}")
        assert resp.status == 401


async def test_before_the_close_out_nothing_is_refunded(client: TestClient) -> None:
    cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    body = await stats(client, cid)
    assert (body["refunded_count"], body["refunded_fen"], body["state"]) == (0, 0, "open")


async def test_a_lottery_pauses_and_closes_out_per_tier(
    client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    cid = (await create_lottery(client, quota_total=100, quota_daily=None))["id"]
    token = await login(client, "drawer")
    client.session.cookie_jar.clear()
    await until_live(client)
    status, body = await admin(client, cid, "pause")
    assert (status, body["state"]) == (200, "paused")
    resp = await client.post(f"/api/campaigns/{cid}/draw", cookies={"hb_session": token})
    assert (resp.status, (await resp.json())["error"]) == (409, "paused")
    assert await view_state(client, cid) == "paused"
    await admin(client, cid, "resume")
    for _ in range(5):
        resp = await client.post(f"/api/campaigns/{cid}/draw", cookies={"hb_session": token})
        assert resp.status == 200
    status, ended = await admin(client, cid, "end")
    assert (status, ended["state"]) == (200, "ended")
    closeout = ended["closeout"]
    assert [c["tier"] for c in closeout] == [t["tier"] for t in ended["tiers"]]
    for tier, left in zip(ended["tiers"], closeout, strict=True):
        assert left["unreleased"] + left["unwon"] + tier["won"] == tier["stock"]
    # Ended early: its 2998 slot of 5 金元宝 was never released.
    assert [c["unreleased"] for c in closeout] == [5, 0]
    await drain(client)
    row = await pg.fetchrow("SELECT * FROM closeouts WHERE campaign_id = $1", cid)
    assert row is not None
    assert (row["refunded_count"], row["refunded_fen"]) == (0, 0)
    report = await operations.reconcile(client.app[REDIS], client.app[PG], cid)
    assert report.ok, report.render()
    assert "close-out (Redis)" in report.render()
    # One more unwon in Redis's close-out than the stock allows, and than the ledger says.
    meta = CampaignKeys.of(cid).meta
    first, _, rest = (await redis.hget(meta, "closeout")).decode().partition(",")
    unreleased, unwon = first.split(":")
    await redis.hset(meta, "closeout", f"{unreleased}:{int(unwon) + 1},{rest}")
    report = await operations.reconcile(client.app[REDIS], client.app[PG], cid)
    assert any(m.startswith("tier 0: unreleased") for m in report.mismatches), report.mismatches
    assert "the ledger's close-out differs from Redis's" in report.mismatches


async def test_pause_grants_nothing_and_resume_grants_again(
    client: TestClient, redis: Redis
) -> None:
    cid = str((await create_campaign(client, total_fen=10_000, count=100))["id"])
    tokens = [await login(client, f"p{i:03d}") for i in range(60)]
    client.session.cookie_jar.clear()
    await until_live(client)
    first = await gather_limited([grab(client, t, cid) for t in tokens[:20]])
    assert {s for s, _ in first} == {200}
    await admin(client, cid, "pause")
    before = await stats(client, cid)
    during = await gather_limited([grab(client, t, cid) for t in tokens])
    assert {(s, b["error"]) for s, b in during} == {(409, "paused")}
    after = await stats(client, cid)
    for field in ("won_count", "won_fen", "remaining_count", "remaining_fen"):
        assert after[field] == before[field] == (20 if field == "won_count" else after[field])
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 20
    await admin(client, cid, "resume")
    again = await gather_limited([grab(client, t, cid) for t in tokens])
    results = [b["result"] for _, b in again]
    assert results.count("already_won") == 20
    assert results.count("won") == 40
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 60


async def test_grabs_racing_end_on_two_workers_add_up_and_close_out_once(
    aiohttp_client, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:  # type: ignore[no-untyped-def]
    a = await aiohttp_client(create_app(settings), headers=PAGE)
    b = await aiohttp_client(create_app(settings), headers=PAGE)
    total, count = 100_000, 500
    cid = str((await create_campaign(a, total_fen=total, count=count))["id"])
    tokens = [await login(a, f"r{i:04d}") for i in range(400)]
    a.session.cookie_jar.clear()
    await until_live(a, b)

    async def end_soon(worker: TestClient) -> tuple[int, dict[str, Any]]:
        # In the thick of it: once a quarter of the players have won.
        while int(await redis.hget(CampaignKeys.of(cid).meta, "won_count") or 0) < 100:
            await asyncio.sleep(0.001)
        return await admin(worker, cid, "end")

    grabs = gather_limited([grab(a if i % 2 else b, t, cid) for i, t in enumerate(tokens)], 50)
    answers, end_a, end_b = await asyncio.gather(grabs, end_soon(a), end_soon(b))
    assert end_a[0] == end_b[0] == 200
    assert end_a[1] == end_b[1]
    ended = end_a[1]
    won = [body["amount_fen"] for status, body in answers if status == 200]
    refused = [body["error"] for status, body in answers if status != 200]
    assert set(refused) <= {"ended"}
    assert len(won) + len(refused) == len(tokens)
    assert (ended["won_count"], ended["won_fen"]) == (len(won), sum(won))
    assert ended["won_fen"] + ended["refunded_fen"] == total
    assert ended["won_count"] + ended["refunded_count"] == count
    # Two workers ended it and three drainers race: one close-out row, the grants exact.
    await drain(a, consumers=3)
    rows = await pg.fetch("SELECT * FROM closeouts WHERE campaign_id = $1", cid)
    assert [(r["refunded_count"], r["refunded_fen"]) for r in rows] == [
        (ended["refunded_count"], ended["refunded_fen"])
    ]
    granted = await pg.fetchval(
        "SELECT coalesce(sum(amount_fen), 0) FROM grabs WHERE campaign_id = $1", cid
    )
    assert 100 <= len(won) < len(tokens)
    assert granted + rows[0]["refunded_fen"] == total
    ended_at = await pg.fetchval("SELECT ended_at FROM campaigns WHERE id = $1", cid)
    assert ended_at == rows[0]["ended_at"]
    report = await operations.reconcile(a.app[REDIS], a.app[PG], cid)
    assert report.ok, report.render()
    assert await redis.xlen(CampaignKeys.of(cid).ledger) == 0


async def test_pause_reaches_the_other_worker_at_once(
    aiohttp_client, settings: Settings, redis: Redis
) -> None:  # type: ignore[no-untyped-def]
    a = await aiohttp_client(create_app(settings), headers=PAGE)
    b = await aiohttp_client(create_app(settings), headers=PAGE)
    cid = str((await create_campaign(a, total_fen=1_000, count=10))["id"])
    token = await login(a, "carol")
    a.session.cookie_jar.clear()
    await until_live(a, b)
    assert await view_state(b, cid) == "open"
    await admin(a, cid, "pause")
    # The script refuses on b at once, whatever b knows yet.
    assert (await grab(b, token, cid))[1]["error"] == "paused"
    deadline = time.monotonic() + 5
    while await view_state(b, cid) != "paused":
        assert time.monotonic() < deadline, "b never learned of the pause"
        await asyncio.sleep(0.01)
    await admin(a, cid, "end")
    deadline = time.monotonic() + 5
    while await view_state(b, cid) != "ended":
        assert time.monotonic() < deadline, "b never learned of the end"
        await asyncio.sleep(0.01)
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 0


async def test_close_out_through_reconcile_and_its_mismatches(
    client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    cid = str((await create_campaign(client, total_fen=5_000, count=50))["id"])
    tokens = [await login(client, f"q{i:02d}") for i in range(20)]
    client.session.cookie_jar.clear()
    await gather_limited([grab(client, t, cid) for t in tokens])
    status, ended = await admin(client, cid, "end")
    assert (status, ended["won_count"], ended["refunded_count"]) == (200, 20, 30)
    redis_pg = client.app[REDIS], client.app[PG]
    # In flight (the close-out still in the stream): OK already.
    report = await operations.reconcile(*redis_pg, cid)
    assert report.ok, report.render()
    await drain(client)
    report = await operations.reconcile(*redis_pg, cid)
    assert report.ok, report.render()
    assert "refunded" in report.render()

    await pg.execute(
        "UPDATE closeouts SET refunded_fen = refunded_fen + 1 WHERE campaign_id = $1", cid
    )
    report = await operations.reconcile(*redis_pg, cid)
    assert not report.ok
    assert any("the ledger's close-out refunds" in m for m in report.mismatches), report.mismatches
    await pg.execute(
        "UPDATE closeouts SET refunded_fen = refunded_fen - 1 WHERE campaign_id = $1", cid
    )
    await redis.hincrby(CampaignKeys.of(cid).meta, "refunded_fen", 7)
    report = await operations.reconcile(*redis_pg, cid)
    assert any("!= 50 envelopes / 5000 fen" in m for m in report.mismatches), report.mismatches
    await redis.hincrby(CampaignKeys.of(cid).meta, "refunded_fen", -7)
    await pg.execute("DELETE FROM closeouts WHERE campaign_id = $1", cid)
    report = await operations.reconcile(*redis_pg, cid)
    assert report.mismatches == [
        "closed out in Redis; the close-out is not in PostgreSQL nor in flight"
    ]


async def test_natural_expiry_is_closed_out_once_by_racing_drainers(
    client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    ends = int(time.time() * 1000) + 1_500
    created = await create_campaign(client, total_fen=2_000, count=20, ends_at=iso(ends))
    cid = str(created["id"])
    tokens = [await login(client, f"n{i:02d}") for i in range(5)]
    client.session.cookie_jar.clear()
    won = await gather_limited([grab(client, t, cid) for t in tokens])
    won_fen = sum(body["amount_fen"] for _, body in won)
    while int(time.time() * 1000) < ends + 50:
        await asyncio.sleep(0.05)
    assert (await stats(client, cid))["refunded_count"] == 0  # nobody noticed yet
    await drain(client, consumers=3)
    body = await stats(client, cid)
    assert (body["state"], body["refunded_count"], body["refunded_fen"]) == (
        "ended",
        15,
        2_000 - won_fen,
    )
    rows = await pg.fetch(
        "SELECT refunded_count, ended_at FROM closeouts WHERE campaign_id = $1", cid
    )
    assert [r["refunded_count"] for r in rows] == [15]
    assert from_datetime(rows[0]["ended_at"]) == ends  # the window's end, not moved
    report = await operations.reconcile(client.app[REDIS], client.app[PG], cid)
    assert report.ok, report.render()
    # Closed out and drained: the next refresh lets go of it.
    await asyncio.sleep(REFRESH_S)
    await drain(client)
    assert not await redis.sismember(CAMPAIGNS_SET, cid)


async def lose(redis: Redis, cid: str) -> None:
    keys = CampaignKeys.of(cid)
    await redis.delete(keys.meta, keys.pool, keys.winners, keys.ledger)


async def test_rebuild_after_a_lost_redis_keeps_paused_ended_and_the_close_out(
    client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    paused = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    ended = str((await create_campaign(client, total_fen=3_000, count=30))["id"])
    tokens = [await login(client, f"b{i:02d}") for i in range(8)]
    client.session.cookie_jar.clear()
    await until_live(client)
    await gather_limited([grab(client, t, c) for t in tokens[:4] for c in (paused, ended)])
    await admin(client, paused, "pause")
    await admin(client, paused, "resume")
    await admin(client, paused, "pause")
    status, closed = await admin(client, ended, "end")
    assert status == 200
    await drain(client)
    assert await pg.fetchval("SELECT paused FROM campaigns WHERE id = $1", paused) is True
    assert await pg.fetchval("SELECT paused FROM campaigns WHERE id = $1", ended) is False
    redis_pg = client.app[REDIS], client.app[PG]
    for cid in (paused, ended):
        await lose(redis, cid)
        result = await operations.rebuild(*redis_pg, cid)
        assert result.winners.count == 4

    body = await stats(client, ended)
    assert {**body, "ledger_lag": 0} == {**closed, "ledger_lag": 0}
    assert (await grab(client, tokens[5], ended))[1]["error"] == "ended"
    body = await stats(client, paused)
    assert (body["state"], body["won_count"]) == ("paused", 4)
    deadline = time.monotonic() + 5
    while (await grab(client, tokens[5], paused))[1].get("error") != "paused":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await admin(client, paused, "resume")
    assert (await grab(client, tokens[5], paused))[1]["result"] == "won"
    # No second close-out: the drainers see it closed, reconcile agrees.
    await drain(client)
    assert await pg.fetchval("SELECT count(*) FROM closeouts WHERE campaign_id = $1", ended) == 1
    for cid in (paused, ended):
        report = await operations.reconcile(*redis_pg, cid)
        assert report.ok, report.render()


async def test_a_pause_during_a_postgresql_outage_pauses_and_is_recorded_after(
    aiohttp_client, settings: Settings, redis: Redis, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = EmbeddedPostgres(tmp_path / "pg", free_port()).start()
    try:
        drained_in_worker = LedgerSettings(block_ms=100, retry_max_ms=300)
        own = settings.with_(database_url=server.url, ledger=drained_in_worker)
        client = await aiohttp_client(create_app(own), headers=PAGE)
        cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
        tokens = [await login(client, f"o{i}") for i in range(3)]
        client.session.cookie_jar.clear()
        assert (await grab(client, tokens[0], cid))[0] == 200

        server.stop()
        status, paused = await admin(client, cid, "pause")
        assert (status, paused["state"]) == (200, "paused")
        assert (await grab(client, tokens[1], cid))[1]["error"] == "paused"
        status, ended = await admin(client, cid, "end")
        assert (status, ended["refunded_count"]) == (200, 9)
        # Redis has decided; PostgreSQL has none of it yet: it is all ledger lag.
        assert ended["ledger_lag"] >= 2

        server.start()
        deadline = time.monotonic() + 30
        while await redis.xlen(CampaignKeys.of(cid).ledger):
            assert time.monotonic() < deadline, "the ledger never caught up"
            await asyncio.sleep(0.1)
        conn = await asyncpg.connect(server.url)
        try:
            row = await conn.fetchrow("SELECT paused, ended_at FROM campaigns WHERE id = $1", cid)
            refund = await conn.fetchval(
                "SELECT refunded_fen FROM closeouts WHERE campaign_id = $1", cid
            )
        finally:
            await conn.close()
        assert row["paused"] is True
        assert row["ended_at"] is not None
        assert refund == ended["refunded_fen"]
        report = await operations.reconcile(client.app[REDIS], client.app[PG], cid)
        assert report.ok, report.render()
    finally:
        server.stop()


async def test_a_worker_that_missed_changes_asks_redis_then_resyncs(
    client: TestClient, redis: Redis
) -> None:
    cid = str((await create_campaign(client, total_fen=1_000, count=10))["id"])
    tokens = [await login(client, f"m{i}") for i in range(3)]
    client.session.cookie_jar.clear()
    await until_live(client)
    await admin(client, cid, "pause")
    assert await view_state(client, cid) == "paused"
    elsewhere = Scripts(redis)  # another worker's calls, whose news this one will miss

    async def disconnected() -> None:
        await redis.client_kill_filter(_type="pubsub")
        deadline = time.monotonic() + 5
        while client.app[EVENTS].live:
            assert time.monotonic() < deadline, "the listener did not notice"
            await asyncio.sleep(0.001)

    await disconnected()
    await elsewhere.set_paused(cid, False)
    # Its memory says paused, but it is not live: the script decides, and grants.
    status, body = await grab(client, tokens[0], cid)
    assert (status, body["result"]) == (200, "won")
    await until_live(client)
    assert await view_state(client, cid) == "open"  # re-read on resubscribing

    await disconnected()
    await elsewhere.set_paused(cid, True)
    assert (await grab(client, tokens[1], cid))[1]["error"] == "paused"
    await until_live(client)
    assert await view_state(client, cid) == "paused"
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 1
