"""The write-behind ledger in-process: drainers copy Redis grants to PostgreSQL exactly once."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.background.drainer import GROUP, Drainer
from app.records import Envelope, GrabRecord, LedgerEntry
from app.settings import LedgerSettings, Settings
from app.store import ledger
from app.store.ledger import Written
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys
from app.web.factory import create_app
from app.web.keys import PG, REDIS
from tests.conftest import ADMIN, PAGE, create_campaign, gather_limited, login

FAST = LedgerSettings(block_ms=50, claim_idle_ms=200, retry_max_ms=200)
MANUAL = LedgerSettings(drain_in_worker=False, block_ms=50, claim_idle_ms=200)


async def grab(client: TestClient, token: str, cid: str) -> dict[str, Any]:
    """POST a grab as the session ``token``; assert 200."""
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def winners_of(redis: Redis, cid: str) -> dict[str, tuple[int, int]]:
    """openid -> (seq, amount) from the Redis winners hash."""
    raw = await redis.hgetall(CampaignKeys.of(cid).winners)
    out = {}
    for user, value in raw.items():
        seq, amount = value.split(b":")
        out[user.decode()] = (int(seq), int(amount))
    return out


async def grabs_of(pg: asyncpg.Connection, cid: str) -> dict[str, tuple[int, int]]:
    """openid -> (seq, amount) from the PostgreSQL grabs table (no duplicates possible)."""
    rows = await pg.fetch("SELECT openid, seq, amount_fen FROM grabs WHERE campaign_id = $1", cid)
    return {r["openid"]: (r["seq"], r["amount_fen"]) for r in rows}


async def wait_drained(redis: Redis, cid: str, within_s: float = 30) -> None:
    """Wait (bounded) until the campaign's ledger stream is empty."""
    deadline = time.monotonic() + within_s
    while await redis.xlen(CampaignKeys.of(cid).ledger) > 0:
        assert time.monotonic() < deadline, "ledger did not drain in time"
        await asyncio.sleep(0.05)


async def test_grabs_land_in_postgres_exactly(
    aiohttp_client: Any, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    client = await aiohttp_client(create_app(settings.with_(ledger=FAST)), headers=PAGE)
    campaign = await create_campaign(client, total_fen=77_777, count=300)
    cid = str(campaign["id"])
    tokens = await asyncio.gather(*(login(client, f"p{i:04d}") for i in range(400)))
    client.session.cookie_jar.clear()
    results = await gather_limited([grab(client, t, cid) for t in tokens])
    assert sum(r["result"] == "won" for r in results) == 300

    await wait_drained(redis, cid)
    winners = await winners_of(redis, cid)
    assert await grabs_of(pg, cid) == winners
    assert sum(a for _, a in winners.values()) == 77_777
    pending = await redis.xpending(CampaignKeys.of(cid).ledger, GROUP)
    assert pending["pending"] == 0
    stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert stats["ledger_lag"] == 0
    assert stats["won_count"] == 300


async def test_ledger_lag_counts_unrecorded_grants(
    aiohttp_client: Any, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    client = await aiohttp_client(create_app(settings.with_(ledger=MANUAL)), headers=PAGE)
    campaign = await create_campaign(client, total_fen=1_000, count=10)
    cid = str(campaign["id"])
    for i in range(7):
        await login(client, f"lag{i}")
        assert (await (await client.post(f"/api/campaigns/{cid}/grab")).json())["result"] == "won"
    stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert stats["ledger_lag"] == 7

    drainer = Drainer(client.app[REDIS], client.app[PG], MANUAL, "test")
    assert await drainer.step() == 7
    stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert stats["ledger_lag"] == 0
    assert await grabs_of(pg, cid) == await winners_of(redis, cid)


async def test_dead_consumer_entries_are_claimed(
    aiohttp_client: Any, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    client = await aiohttp_client(create_app(settings.with_(ledger=MANUAL)), headers=PAGE)
    campaign = await create_campaign(client, total_fen=5_000, count=50)
    cid = str(campaign["id"])
    tokens = await asyncio.gather(*(login(client, f"c{i}") for i in range(20)))
    client.session.cookie_jar.clear()
    await asyncio.gather(*(grab(client, t, cid) for t in tokens))
    stream = CampaignKeys.of(cid).ledger

    # A consumer reads everything, then "dies" before recording or acknowledging.
    dead = Drainer(client.app[REDIS], client.app[PG], MANUAL, "dead")
    await dead._refresh()
    got = await redis.xreadgroup(GROUP, "dead", {stream: ">"}, count=100)
    assert len(got[0][1]) == 20
    assert (await redis.xpending(stream, GROUP))["pending"] == 20

    alive = Drainer(client.app[REDIS], client.app[PG], MANUAL, "alive")
    assert await alive.step() == 0  # nothing new, and nothing idle long enough yet
    await asyncio.sleep(MANUAL.claim_idle_ms / 1000 + 0.1)
    alive._claimed_at = float("-inf")
    assert await alive.step() == 20
    assert (await redis.xpending(stream, GROUP))["pending"] == 0
    assert await redis.xlen(stream) == 0
    assert await grabs_of(pg, cid) == await winners_of(redis, cid)


async def test_redelivery_is_idempotent_and_contradictions_are_kept(
    client: TestClient, pg: asyncpg.Connection
) -> None:
    campaign = await create_campaign(client, total_fen=300, count=3)
    cid = str(campaign["id"])
    envelopes = await ledger.fetch_envelopes(client.app[PG], cid)
    now = str(int(time.time() * 1000))

    def entry(stream_id: str, user: str, envelope: Envelope) -> GrabRecord:
        fields = {"u": user, "s": str(envelope.seq), "a": str(envelope.amount_fen), "t": now}
        record = LedgerEntry(cid, stream_id, fields).decode()
        assert isinstance(record, GrabRecord)
        return record

    first = [entry("1-0", "ann", envelopes[0]), entry("1-1", "bob", envelopes[1])]
    async with client.app[PG].acquire() as conn:
        assert await ledger.write_grabs(conn, first) == Written(2, 0)
        # The same entries again (drainer died between COMMIT and XACK): nothing changes.
        assert await ledger.write_grabs(conn, first) == Written(0, 0)
        # ann again with another envelope, and bob's envelope to carl: both contradict.
        clash = [entry("2-0", "ann", envelopes[2]), entry("2-1", "carl", envelopes[1])]
        assert await ledger.write_grabs(conn, clash) == Written(0, 2)
    bad = [LedgerEntry(cid, "3-0", {"u": "dan", "s": "x"})]
    assert await ledger.record(client.app[PG], bad) == Written(0, 1)
    assert await grabs_of(pg, cid) == {
        "ann": (envelopes[0].seq, envelopes[0].amount_fen),
        "bob": (envelopes[1].seq, envelopes[1].amount_fen),
    }
    rejects = await pg.fetch(
        "SELECT stream_id, reason FROM ledger_rejects WHERE campaign_id = $1 ORDER BY 1", cid
    )
    assert [r["stream_id"] for r in rejects] == ["2-0", "2-1", "3-0"]


async def test_unknown_kind_is_kept_not_lost(
    aiohttp_client: Any, settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    client = await aiohttp_client(create_app(settings.with_(ledger=MANUAL)), headers=PAGE)
    campaign = await create_campaign(client, total_fen=300, count=3)
    cid = str(campaign["id"])
    stream = CampaignKeys.of(cid).ledger
    await redis.xadd(stream, {"k": "mystery", "u": "eve", "t": "1"})
    drainer = Drainer(client.app[REDIS], client.app[PG], MANUAL, "test")
    assert await drainer.step() == 1
    assert drainer.written == Written(0, 1)
    assert await redis.xlen(stream) == 0
    row = await pg.fetchrow("SELECT kind, fields, reason FROM ledger_rejects")
    assert row is not None
    assert row["kind"] == "mystery"
    assert "mystery" in row["reason"]


class StopAtRead(Redis):
    """A real client that has the drainer stopped right after it issues XREADGROUP: in the
    same loop turn, before the read task's first step (where a worker's shutdown can land)."""

    drainer: Drainer | None = None

    def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        assert self.drainer is not None
        asyncio.get_running_loop().call_soon(self.drainer.stop)
        return super().xreadgroup(*args, **kwargs)


async def test_stop_before_the_read_starts_leaves_no_command_unawaited(
    redis_url: str, settings: Settings
) -> None:
    client = StopAtRead.from_url(redis_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=1)
    try:
        await client.sadd(CAMPAIGNS_SET, "stopped")
        drainer = client.drainer = Drainer(client, pool, FAST, "stop-test")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert await drainer.step() == 0
            client.drainer = None
            del drainer
            gc.collect()
        assert [str(w.message) for w in seen] == []
    finally:
        await pool.close()
        await client.aclose()
