"""Lottery draws below HTTP: odds, release schedules, quotas across days, randomness.

The scripts read Redis's clock, so these tests run on a private Redis whose clock they set
(tests.frozen_redis: the real server under libfaketime): day and slot boundaries are
crossed by setting Redis's time rather than sleeping, while the service keeps the
machine's clock, months away from Redis's. The script is also called directly with
chosen randomness.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from app.campaigns import operations
from app.campaigns.service import CampaignService
from app.errors import QuotaExhausted
from app.lottery.spec import RANDOM_BITS
from app.model import day_date, shanghai_day, to_datetime
from app.records import DrawRecord, LedgerEntry, MalformedRecord
from app.store import ledger
from app.store.scripts import (
    CampaignKeys,
    Draw,
    DrawBatchResult,
    DrawCode,
    DrawStatus,
    Scripts,
    daily_key,
)
from tests.frozen_redis import FrozenRedis


def ms(moment: str) -> int:
    """Unix milliseconds of an RFC 3339 time."""
    return int(datetime.fromisoformat(moment).timestamp() * 1000)


@pytest.fixture
def clock(tmp_path: Path) -> Iterator[FrozenRedis]:
    """A private Redis whose clock stands still at ``clock.now`` until the test sets it."""
    server = FrozenRedis(tmp_path / "redis", ms("2027-02-09T12:00:00+08:00"))
    yield server
    server.stop()


@pytest.fixture
async def redis(clock: FrozenRedis) -> AsyncIterator[Redis]:
    """A client on the frozen Redis, for asserting end state."""
    client = Redis.from_url(clock.url)
    yield client
    await client.aclose()


@pytest.fixture
async def stores(clock: FrozenRedis, database_url: str, clean: None) -> AsyncIterator[Any]:
    redis = Redis.from_pool(BlockingConnectionPool.from_url(clock.url, max_connections=32))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    await ledger.migrate(pool)
    yield redis, pool
    await pool.close()
    await redis.aclose()


@pytest.fixture
def service(stores: Any) -> CampaignService:
    """The service on the machine's clock: only Redis's may decide."""
    redis, pool = stores
    return CampaignService(redis, pool, Scripts(redis), batch_max=128)


@pytest.fixture
def scripts(stores: Any) -> Scripts:
    return Scripts(stores[0])


async def settle(
    scripts: Scripts, clock: FrozenRedis, cid: str, draws: list[tuple[str, int]]
) -> DrawBatchResult:
    """Call draw_prize directly at Redis's time ``clock.now``, guessing its day right."""
    return await scripts.draw_prize(cid, shanghai_day(clock.now), [Draw(u, r) for u, r in draws])


async def make(service: CampaignService, **fields: Any) -> str:
    body: dict[str, Any] = {
        "kind": "lottery",
        "name": "财神到",
        "starts_at": "2027-02-09T00:00:00+08:00",
        "ends_at": "2027-02-20T00:00:00+08:00",
        "quota_total": 100_000,
    }
    body.update(fields)
    return (await service.create(body)).id


async def attempt(service: CampaignService, cid: str, openid: str) -> str:
    """One draw: "prize", "no_prize", or the quota scope that refused it."""
    try:
        outcome = await service.draw(await service.ensure_open(cid), openid)
    except QuotaExhausted as exc:
        return str(exc.extra["scope"])
    return "prize" if outcome.result.code is DrawCode.PRIZE else "no_prize"


async def test_daily_quota_turns_over_at_midnight_in_shanghai(
    service: CampaignService, clock: FrozenRedis, redis: Redis
) -> None:
    cid = await make(
        service,
        tiers=[{"name": "福", "stock": 1000, "weight": 1, "value_fen": 100}],
        no_prize_weight=1,
        quota_total=5,
        quota_daily=2,
    )
    players = [f"p{i:02d}" for i in range(50)]

    async def day_of_draws() -> Counter[str]:
        tries = [attempt(service, cid, p) for p in players for _ in range(4)]
        results = await asyncio.gather(*tries)
        return Counter("ok" if r in {"prize", "no_prize"} else r for r in results)

    # 23:59:59.999 in Shanghai and the next millisecond are the same day in UTC (15:59Z/16:00Z):
    # only a day counted in Asia/Shanghai lets the second batch through.
    clock.now = ms("2027-02-09T23:59:59.999+08:00")
    assert await day_of_draws() == {"ok": 100, "daily": 100}
    clock.now += 1
    assert await day_of_draws() == {"ok": 100, "daily": 100}
    clock.now += 24 * 3600 * 1000
    assert await day_of_draws() == {"ok": 50, "total": 150}

    keys = CampaignKeys.of(cid)
    for day, each in ((20270209, b"2"), (20270210, b"2"), (20270211, b"1")):
        assert set((await redis.hgetall(daily_key(cid, day))).values()) == {each}
    assert set((await redis.hgetall(keys.draws)).values()) == {b"5"}
    days = Counter(e[1][b"d"] for e in await redis.xrange(keys.ledger))
    assert days == {b"20270209": 100, b"20270210": 100, b"20270211": 50}
    stats = await service.stats(cid)
    assert stats["draws_per_day"] == {"20270209": 100, "20270210": 100, "20270211": 50}


def test_shanghai_day_boundaries() -> None:
    assert shanghai_day(ms("2027-02-09T15:59:59.999Z")) == 20270209
    assert shanghai_day(ms("2027-02-09T16:00:00Z")) == 20270210
    assert shanghai_day(ms("2026-12-31T16:00:00Z")) == 20270101


@pytest.mark.parametrize("when_out", ["renormalise", "fallback"])
async def test_release_schedule_holds(
    service: CampaignService, clock: FrozenRedis, redis: Redis, when_out: str
) -> None:
    """No tier gives out more than it has released by the time of the draw."""
    slots = [
        ("2027-02-09T20:00:00+08:00", 3),
        ("2027-02-10T20:00:00+08:00", 3),
        ("2027-02-11T20:00:00+08:00", 4),
    ]
    cid = await make(
        service,
        tiers=[
            {
                "name": "金元宝",
                "stock": 10,
                "weight": 1000,
                "value_fen": 88_800,
                "schedule": [{"at": at, "release": n} for at, n in slots],
            }
        ],
        no_prize_weight=1,
        when_out=when_out,
    )
    keys = CampaignKeys.of(cid)
    checkpoints = [
        ("2027-02-09T19:59:59.999+08:00", 0),
        ("2027-02-09T20:00:00+08:00", 3),
        ("2027-02-10T19:59:59.999+08:00", 3),
        ("2027-02-10T20:00:00+08:00", 6),
        ("2027-02-11T20:00:00.001+08:00", 10),
        ("2027-02-19T23:00:00+08:00", 10),
    ]
    for n, (moment, released) in enumerate(checkpoints):
        clock.now = ms(moment)
        await asyncio.gather(*(attempt(service, cid, f"c{n}-{i}") for i in range(40)))
        won = int(await redis.hget(keys.tiers, "won:0") or 0)
        # Each draw picks the tier with odds 1000/1001 while it has stock: it is won out.
        assert won == released, (moment, won)
        stats = await service.stats(cid)
        assert (stats["tiers"][0]["released"], stats["tiers"][0]["left"]) == (released, 0)
    prizes = [e for e in await redis.xrange(keys.ledger) if e[1][b"p"] == b"0"]
    for moment, released in checkpoints:
        by_then = [e for e in prizes if int(e[1][b"t"]) <= ms(moment)]
        assert len(by_then) <= released


async def test_release_schedule_under_concurrent_script_calls(
    service: CampaignService, scripts: Scripts, clock: FrozenRedis, redis: Redis
) -> None:
    cid = await make(
        service,
        tiers=[
            {
                "name": "金元宝",
                "stock": 50,
                "weight": 10,
                "value_fen": 88_800,
                "schedule": [
                    {"at": "2027-02-10T00:00:00+08:00", "release": 20},
                    {"at": "2027-02-11T00:00:00+08:00", "release": 30},
                ],
            },
        ],
        no_prize_weight=1,
    )
    clock.now = ms("2027-02-10T08:00:00+08:00")
    calls = [
        settle(scripts, clock, cid, [(f"u{i}-{j}", secrets.randbits(RANDOM_BITS))])
        for i in range(50)
        for j in range(20)
    ]
    results = await asyncio.gather(*calls)
    prizes = sum(1 for b in results for r in b.results if r.code is DrawCode.PRIZE)
    assert prizes == 20
    assert await redis.hget(CampaignKeys.of(cid).tiers, "won:0") == b"20"


async def test_empirical_odds_match_the_weights(
    service: CampaignService, scripts: Scripts, clock: FrozenRedis, redis: Redis
) -> None:
    """Chi-square goodness of fit of 100,000 draws at significance 0.001."""
    weights = [1, 4, 15, 80, 150, 250]
    no_prize = 500
    cid = await make(
        service,
        tiers=[
            {"name": f"t{i}", "stock": 1_000_000, "weight": w, "value_fen": 100}
            for i, w in enumerate(weights)
        ],
        no_prize_weight=no_prize,
        quota_total=1000,
    )
    observed: Counter[int] = Counter()
    batch = 2000
    for start in range(0, 100_000, batch):
        draws = [
            (f"p{i % 100}", secrets.randbits(RANDOM_BITS)) for i in range(start, start + batch)
        ]
        batch_result = await settle(scripts, clock, cid, draws)
        assert batch_result.status is DrawStatus.SETTLED
        observed.update(r.tier for r in batch_result.results)
    total = sum(weights) + no_prize
    expected = {i: 100_000 * w / total for i, w in enumerate(weights)}
    expected[-1] = 100_000 * no_prize / total
    chi2 = sum((observed[k] - e) ** 2 / e for k, e in expected.items())
    # Critical value of chi-square with 6 degrees of freedom at p = 0.001.
    assert chi2 < 22.458, (chi2, observed)
    won = await redis.hgetall(CampaignKeys.of(cid).tiers)
    assert {i: int(won[f"won:{i}".encode()]) for i in range(6)} == {
        i: observed[i] for i in range(6)
    }


async def test_pick_uses_the_randomness_passed_in(
    service: CampaignService, scripts: Scripts, clock: FrozenRedis
) -> None:
    """The tier is a function of ARGV's random number: rand mod total over the weights."""
    cid = await make(
        service,
        tiers=[
            {"name": "甲", "stock": 1000, "weight": 2, "value_fen": 100},
            {"name": "乙", "stock": 1000, "weight": 3, "value_fen": 200},
        ],
        no_prize_weight=5,
    )
    rands = [0, 1, 2, 4, 5, 9, 10, 2**52 - 1, 2**52 - 9, 2**51 + 3]
    picked = await settle(scripts, clock, cid, [(f"r{i}", r) for i, r in enumerate(rands)])
    assert picked.status is DrawStatus.SETTLED

    def expected(rand: int) -> int:
        x = rand % 10
        return 0 if x < 2 else 1 if x < 5 else -1

    assert [r.tier for r in picked.results] == [expected(r) for r in rands]
    # Same randomness, same pick; fresh randomness from the service varies per call.
    again = await settle(scripts, clock, cid, [("again", 2**52 - 1)])
    assert again.results[0].tier == expected(2**52 - 1)


async def test_service_draws_differ_per_call(service: CampaignService) -> None:
    cid = await make(
        service,
        tiers=[
            {"name": "甲", "stock": 1000, "weight": 1, "value_fen": 100},
            {"name": "乙", "stock": 1000, "weight": 1, "value_fen": 200},
        ],
    )
    campaign = await service.ensure_open(cid)
    outcomes = [await service.draw(campaign, "same-player") for _ in range(40)]
    outcomes += await asyncio.gather(*(service.draw(campaign, "same-player") for _ in range(40)))
    tiers = Counter(o.result.tier for o in outcomes)
    # Both tiers have odds 1/2; forty of one kind in a row has odds 2^-79 per batch.
    assert tiers.keys() == {0, 1}
    assert min(tiers.values()) >= 10


@pytest.mark.parametrize(
    ("when_out", "second"), [("renormalise", 1), ("fallback", -1)], ids=["renormalise", "fallback"]
)
async def test_tier_out_of_stock(
    service: CampaignService, scripts: Scripts, clock: FrozenRedis, when_out: str, second: int
) -> None:
    """A picked tier with nothing left: renormalise over the rest, or give no prize."""
    cid = await make(
        service,
        tiers=[
            {"name": "甲", "stock": 1, "weight": 1, "value_fen": 100},
            {"name": "乙", "stock": 1, "weight": 1, "value_fen": 200},
        ],
        when_out=when_out,
    )
    results = (await settle(scripts, clock, cid, [("a", 0), ("b", 0), ("c", 0)])).results
    assert [r.tier for r in results] == [0, second, -1]
    assert [r.code for r in results] == [
        DrawCode.PRIZE,
        DrawCode.PRIZE if second >= 0 else DrawCode.NO_PRIZE,
        DrawCode.NO_PRIZE,
    ]


async def test_script_checks_kind_and_window(
    service: CampaignService, scripts: Scripts, clock: FrozenRedis
) -> None:
    cid = await make(service, tiers=[{"name": "甲", "stock": 1, "weight": 1, "value_fen": 1}])
    packet = (
        await service.create({"kind": "red_packet", "name": "红包", "total_fen": 100, "count": 1})
    ).id
    clock.now = ms("2027-02-08T23:59:59.999+08:00")
    assert (await settle(scripts, clock, cid, [("a", 0)])).status is DrawStatus.NOT_STARTED
    clock.now += 1
    assert (await settle(scripts, clock, cid, [("a", 0)])).status is DrawStatus.SETTLED
    clock.now = ms("2027-02-19T23:59:59.999+08:00")
    assert (await settle(scripts, clock, cid, [("b", 0)])).status is DrawStatus.SETTLED
    clock.now += 1
    assert (await settle(scripts, clock, cid, [("c", 0)])).status is DrawStatus.ENDED
    assert (await settle(scripts, clock, packet, [("a", 0)])).status is DrawStatus.WRONG_KIND
    assert (await settle(scripts, clock, "nope", [("a", 0)])).status is DrawStatus.NOT_FOUND


async def _drain_into_ledger(redis: Redis, pool: asyncpg.Pool, cid: str) -> int:
    """Feed the stream's draw entries to the batch writer, then replay them all once more."""
    entries = await redis.xrange(CampaignKeys.of(cid).ledger)
    records = [LedgerEntry.of(cid, sid, f).decode() for sid, f in entries]
    assert all(isinstance(r, DrawRecord) for r in records)
    draws = cast(list[DrawRecord], records)
    async with pool.acquire() as conn:
        written = ledger.Written()
        for start in range(0, len(records), 64):
            written += await ledger.write_draws(conn, draws[start : start + 64])
        assert await ledger.write_draws(conn, draws) == ledger.Written(0, 0)
    assert written.rejected == 0
    return written.inserted


async def test_draws_reach_the_ledger_and_reconcile(
    service: CampaignService, clock: FrozenRedis, stores: Any
) -> None:
    redis, pool = stores
    cid = await make(
        service,
        tiers=[
            {"name": "金元宝", "stock": 3, "weight": 1, "value_fen": 88_800},
            {"name": "福袋", "stock": 500, "weight": 3, "value_fen": None},
        ],
        no_prize_weight=2,
        quota_total=4,
        quota_daily=3,
    )
    players = [f"p{i:02d}" for i in range(40)]
    clock.now = ms("2027-02-09T23:59:00+08:00")
    await asyncio.gather(*(attempt(service, cid, p) for p in players for _ in range(3)))
    clock.now = ms("2027-02-10T00:01:00+08:00")
    await asyncio.gather(*(attempt(service, cid, p) for p in players for _ in range(3)))

    assert await _drain_into_ledger(redis, pool, cid) == 160
    # In flight, every draw is "lag"; once recorded (and deleted, as drainers do), none is.
    assert (await operations.reconcile(redis, pool, cid)).mismatches == []
    await redis.delete(CampaignKeys.of(cid).ledger)
    assert (await operations.reconcile(redis, pool, cid)).mismatches == []
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM draws WHERE campaign_id = $1", cid)
        gold = [r for r in rows if r["tier"] == 0]
        assert len(gold) == 3
        assert {r["value_fen"] for r in gold} == {88_800}
        assert {r["value_fen"] for r in rows if r["tier"] != 0} == {0}
        days = Counter(r["day"].isoformat() for r in rows)
        assert days == {"2027-02-09": 120, "2027-02-10": 40}
        late = [r for r in rows if r["day"].isoformat() == "2027-02-10"]
        assert {r["drawn_at"].timestamp() * 1000 for r in late} == {clock.now}

        # A draw lost on the way and a counter out of step are both reported.
        victim = gold[0]
        await conn.execute(
            "DELETE FROM draws WHERE campaign_id = $1 AND openid = $2 AND draw_no = $3",
            cid,
            victim["openid"],
            victim["draw_no"],
        )
        await redis.hincrby(CampaignKeys.of(cid).tiers, "won:1", 1)
    report = await operations.reconcile(redis, pool, cid)
    assert not report.ok
    user, day = victim["openid"], victim["day"].strftime("%Y%m%d")
    assert report.mismatches[:3] == [
        f"player {user}: draw(s) {victim['draw_no']} of 4 settled in Redis, "
        "not in PostgreSQL nor in flight",
        "tier 0: 3 won in Redis, 2 in the ledger",
        report.mismatches[2],
    ]
    assert report.mismatches[2].startswith("tier 1: ")
    rest = "\n".join(report.mismatches[3:])
    assert f"player {user} on {day}: " in rest
    assert f"day {day}: " in rest
    assert f"player {user}: prizes (draw:tier)" in rest
    # Payout reconcile (app.payout) adds its own lines, e.g. a bill for the lost draw.
    lottery = [m for m in report.mismatches if not m.startswith("bill ")]
    assert len(lottery) == 7, report.mismatches


async def test_draw_redelivery_is_a_no_op_and_contradictions_are_kept(
    service: CampaignService, stores: Any
) -> None:
    _, pool = stores
    cid = await make(service, tiers=[{"name": "金", "stock": 5, "weight": 1, "value_fen": 500}])

    def entry(stream_id: str, user: str, n: int, tier: int, fen: int) -> DrawRecord:
        fields = {"k": "draw", "u": user, "n": str(n), "p": str(tier), "a": str(fen)}
        all_fields = {**fields, "t": "1802275200123", "d": "20270210"}
        record = LedgerEntry(cid, stream_id, all_fields).decode()
        assert isinstance(record, DrawRecord)
        return record

    first = [entry("1-0", "ann", 1, 0, 500), entry("1-1", "ann", 2, -1, 0)]
    async with pool.acquire() as conn:
        assert await ledger.write_draws(conn, first) == ledger.Written(2, 0)
        # The same entries again (a drainer died between COMMIT and XACK): nothing changes.
        assert await ledger.write_draws(conn, first) == ledger.Written(0, 0)
        # After Redis lost ann's draws, her numbers come again with other outcomes; in the
        # same batch bob's draw 1 twice, the second telling another story.
        clash = [
            entry("2-0", "ann", 1, -1, 0),
            entry("2-1", "ann", 2, 0, 500),
            entry("2-2", "bob", 1, 0, 500),
            entry("2-3", "bob", 1, -1, 0),
        ]
        assert await ledger.write_draws(conn, clash) == ledger.Written(1, 3)
        # A replay of the whole lot adds nothing: rejects are kept once.
        assert await ledger.write_draws(conn, first + clash) == ledger.Written(0, 0)
        rows = await conn.fetch(
            "SELECT openid, draw_no, tier, value_fen, stream_id FROM draws"
            " WHERE campaign_id = $1 ORDER BY 1, 2",
            cid,
        )
        rejects = await ledger.fetch_rejects(pool, cid)
    assert [tuple(r) for r in rows] == [
        ("ann", 1, 0, 500, "1-0"),
        ("ann", 2, None, 0, "1-1"),
        ("bob", 1, 0, 500, "2-2"),
    ]
    assert [(r["stream_id"], r["kind"]) for r in rejects] == [
        ("2-0", "draw"),
        ("2-1", "draw"),
        ("2-3", "draw"),
    ]
    assert all("contradicts" in r["reason"] for r in rejects)
    kept = orjson.loads(rejects[0]["fields"])
    assert (kept["u"], kept["n"], kept["p"], kept["a"], kept["d"]) == ("ann", 1, -1, 0, "20270210")


def test_draw_record_from_a_stream_entry() -> None:
    fields = {"k": "draw", "u": "o1", "n": "7", "p": "-1", "a": "0", "d": "20270210"}
    record = LedgerEntry("c1", "1-0", {**fields, "t": "1802275200123"}).decode()
    assert isinstance(record, DrawRecord)
    assert (record.openid, record.draw_no, record.tier, record.value_fen) == ("o1", 7, None, 0)
    assert day_date(record.day).isoformat() == "2027-02-10"
    assert to_datetime(record.at_ms).isoformat() == "2027-02-10T16:00:00.123000+00:00"
    with pytest.raises(MalformedRecord, match="no field 't'"):
        LedgerEntry("c1", "1-0", fields).decode()
    with pytest.raises(MalformedRecord, match="invalid literal"):
        LedgerEntry("c1", "1-0", {**fields, "t": "soon"}).decode()
    with pytest.raises(MalformedRecord, match="unknown kind"):
        LedgerEntry("c1", "1-0", {**fields, "k": "mystery", "t": "1"}).decode()
