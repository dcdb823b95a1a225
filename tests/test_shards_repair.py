"""Reconcile and rebuild of a sharded red packet ("shards": 4), on one real Redis and
PostgreSQL.

Invariants: reconcile compares each sub-pool with PostgreSQL's envelopes of its seqs
(seq % K), names the sub-pool of every mismatch, and finds an envelope held outside its
sub-pool or a player who won in two; once closed out, won + refunded makes up each
sub-pool's budget and the campaign's, in Redis and in the ledger. rebuild restores
exactly the sub-pools lost (and the campaign's own meta if lost), with their winners,
envelopes and close-out, after which every earlier winner is answered already_won with
the same amount and the campaign still sells out exactly: count envelopes, total_fen,
nobody twice.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.campaigns import operations
from app.errors import OperationError
from app.records import Envelope
from app.redpacket.reconcile import ReconcileReport
from app.redpacket.spec import RedPacket
from app.settings import Settings
from app.store.scripts import CampaignKeys
from app.web.keys import PG, REDIS
from tests.conftest import create_campaign, gather_limited, login
from tests.test_lifecycle import MANUAL, admin, drain, grab, stats

SHARDS = 4


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The tests drain with drainers of their own, when they choose."""
    return settings.with_(ledger=MANUAL)


async def sharded(client: TestClient, total_fen: int, count: int) -> RedPacket:
    """A new red packet of SHARDS sub-pools, as PostgreSQL defines it."""
    created = await create_campaign(client, total_fen=total_fen, count=count, shards=SHARDS)
    campaign = await operations.definition(client.app[PG], str(created["id"]))
    assert len(campaign.spec.pools) == SHARDS
    return campaign


async def players(client: TestClient, prefix: str, n: int) -> list[str]:
    tokens = [await login(client, f"{prefix}{i:03d}") for i in range(n)]
    client.session.cookie_jar.clear()
    return tokens


async def reconciled(client: TestClient, cid: str) -> ReconcileReport:
    report = await operations.reconcile(client.app[REDIS], client.app[PG], cid)
    assert isinstance(report, operations.WithPayouts)
    assert isinstance(report.grants, ReconcileReport)
    return report.grants


async def lose(redis: Redis, pool_id: str) -> None:
    """Redis loses a pool's meta, envelopes and winners (its stream is drained)."""
    keys = CampaignKeys.of(pool_id)
    await redis.delete(keys.meta, keys.pool, keys.winners)


async def winners_of(redis: Redis, campaign: RedPacket) -> dict[str, tuple[int, Envelope]]:
    """Every sub-pool's winners: openid -> (shard, envelope)."""
    found: dict[str, tuple[int, Envelope]] = {}
    for shard, pool_id in enumerate(campaign.spec.pools):
        for user, raw in (await redis.hgetall(CampaignKeys.of(pool_id).winners)).items():
            assert user.decode() not in found, f"{user!r} won in two sub-pools"
            found[user.decode()] = (shard, Envelope.decode(raw))
    return found


async def test_a_lost_sub_pool_is_listed_then_rebuilt_and_the_campaign_sells_out_exactly(
    client: TestClient, redis: Redis
) -> None:
    campaign = await sharded(client, total_fen=20_000, count=200)
    cid, pools = campaign.id, campaign.spec.pools
    first = await players(client, "s", 120)
    answers = await gather_limited([grab(client, t, cid) for t in first])
    assert all((status, body["result"]) == (200, "won") for status, body in answers)
    # Undrained: every grant is in flight, none a mismatch.
    report = await reconciled(client, cid)
    assert report.ok, report.render()
    assert (report.redis_winners.count, report.ledger_lag) == (120, 120)
    with pytest.raises(OperationError, match="live in Redis"):
        await operations.rebuild(client.app[REDIS], client.app[PG], cid)

    lost = 2
    keys = CampaignKeys.of(pools[lost])
    assert await redis.xlen(keys.ledger) > 0
    meta = await redis.hgetall(keys.meta)
    await redis.delete(keys.meta)
    with pytest.raises(OperationError, match="shard 2 are still in Redis"):
        await operations.rebuild(client.app[REDIS], client.app[PG], cid)
    await redis.hset(keys.meta, mapping=meta)
    await drain(client)
    report = await reconciled(client, cid)
    assert report.ok, report.render()
    rendered = report.render()
    assert f"sub-pools ({SHARDS}), in Redis:" in rendered
    assert "result: OK" in rendered
    before = await winners_of(redis, campaign)
    assert sum(1 for shard, _ in before.values() if shard == lost) > 0

    await lose(redis, pools[lost])
    report = await reconciled(client, cid)
    assert report.mismatches == ["shard 2: sub-pool missing from Redis (lost?): run `rebuild`"]
    assert "missing" in report.render()

    result = await operations.rebuild(client.app[REDIS], client.app[PG], cid)
    assert (result.shards, result.of_shards, result.meta) == ((lost,), SHARDS, False)
    assert result.winners.count == sum(1 for shard, _ in before.values() if shard == lost)
    assert "sub-pools restored: 2 (of 4)" in result.render()
    assert await winners_of(redis, campaign) == before
    report = await reconciled(client, cid)
    assert report.ok, report.render()
    with pytest.raises(OperationError, match="live in Redis"):
        await operations.rebuild(client.app[REDIS], client.app[PG], cid)

    again = await gather_limited([grab(client, t, cid) for t in first])
    assert [body for _, body in again] == [
        {"result": "already_won", "amount_fen": body["amount_fen"]} for _, body in answers
    ]
    late = await players(client, "t", 100)
    after = await gather_limited([grab(client, t, cid) for t in late])
    results = [body["result"] for _, body in after]
    assert (results.count("won"), results.count("sold_out")) == (80, 20)
    winners = await winners_of(redis, campaign)
    assert len(winners) == 200
    assert len({e.seq for _, e in winners.values()}) == 200
    assert sum(e.amount_fen for _, e in winners.values()) == 20_000
    await drain(client)
    report = await reconciled(client, cid)
    assert report.ok, report.render()
    assert report.pg_grabs.count == 200


async def test_a_winner_in_two_sub_pools_and_an_envelope_in_the_wrong_one_are_listed(
    client: TestClient, redis: Redis
) -> None:
    campaign = await sharded(client, total_fen=8_000, count=80)
    cid, pools = campaign.id, campaign.spec.pools
    tokens = await players(client, "c", 40)
    await gather_limited([grab(client, t, cid) for t in tokens])
    await drain(client)
    assert (await reconciled(client, cid)).ok
    winners = await winners_of(redis, campaign)
    player, (home, _) = sorted(winners.items())[0]
    other = (home + 1) % SHARDS
    other_keys = CampaignKeys.of(pools[other])

    # A second win planted in another sub-pool, its counters kept consistent.
    raw = await redis.lpop(other_keys.pool)
    assert isinstance(raw, bytes)
    planted = Envelope.decode(raw)
    await redis.hset(other_keys.winners, player, raw)
    await redis.hincrby(other_keys.meta, "won_count", 1)
    await redis.hincrby(other_keys.meta, "won_fen", planted.amount_fen)
    report = await reconciled(client, cid)
    assert not report.ok
    twice = f"player {player}: a Redis winner in shards {min(home, other)}, {max(home, other)}"
    assert any(m.startswith(twice) for m in report.mismatches), report.mismatches
    assert any(m.startswith(f"shard {other}: player {player}:") for m in report.mismatches)
    await redis.hdel(other_keys.winners, player)
    await redis.hincrby(other_keys.meta, "won_count", -1)
    await redis.hincrby(other_keys.meta, "won_fen", -planted.amount_fen)
    await redis.lpush(other_keys.pool, raw)
    assert (await reconciled(client, cid)).ok

    # An envelope moved to another sub-pool's pool.
    source, target = CampaignKeys.of(pools[0]), CampaignKeys.of(pools[1])
    raw = await redis.rpop(source.pool)
    assert isinstance(raw, bytes)
    moved = Envelope.decode(raw)
    position = await redis.rpush(target.pool, raw) - 1
    report = await reconciled(client, cid)
    assert (
        f"shard 1: the pool (position {position}) holds envelope {moved.seq}, which belongs "
        "to shard 0"
    ) in report.mismatches, report.mismatches
    await redis.rpop(target.pool)
    await redis.rpush(source.pool, raw)
    assert (await reconciled(client, cid)).ok


async def test_closed_out_shards_balance_and_a_lost_closed_sub_pool_comes_back_closed(
    client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    campaign = await sharded(client, total_fen=6_000, count=60)
    cid, pools = campaign.id, campaign.spec.pools
    tokens = await players(client, "e", 25)
    await gather_limited([grab(client, t, cid) for t in tokens])
    status, ended = await admin(client, cid, "end")
    assert (status, ended["won_count"], ended["refunded_count"]) == (200, 25, 35)
    # The close-outs still in the streams: OK already.
    report = await reconciled(client, cid)
    assert report.ok, report.render()
    await drain(client)
    report = await reconciled(client, cid)
    assert report.ok, report.render()
    assert report.refunded is not None
    assert report.ledger_refund == report.refunded
    assert report.redis_winners + report.refunded == report.envelopes
    assert await pg.fetchval("SELECT count(*) FROM closeouts WHERE campaign_id = $1", cid) == 4

    await pg.execute(
        "UPDATE closeouts SET refunded_fen = refunded_fen + 1 WHERE campaign_id = $1 AND shard = 1",
        cid,
    )
    report = await reconciled(client, cid)
    assert any(m.startswith("shard 1: the ledger's close-out refunds") for m in report.mismatches)
    assert any(m.startswith("all sub-pools, ledger: ") for m in report.mismatches)
    await pg.execute(
        "UPDATE closeouts SET refunded_fen = refunded_fen - 1 WHERE campaign_id = $1 AND shard = 1",
        cid,
    )
    await redis.hincrby(CampaignKeys.of(pools[3]).meta, "refunded_fen", 7)
    report = await reconciled(client, cid)
    assert any(m.startswith("shard 3: won ") for m in report.mismatches), report.mismatches
    assert any(m.startswith("all sub-pools, Redis: ") for m in report.mismatches)
    await redis.hincrby(CampaignKeys.of(pools[3]).meta, "refunded_fen", -7)
    assert (await reconciled(client, cid)).ok

    lifecycle = ("ends_at_ms", "closed_ms", "refunded_count", "refunded_fen")
    kept = await redis.hmget(CampaignKeys.of(pools[3]).meta, *lifecycle)
    await lose(redis, pools[3])
    await redis.delete(CampaignKeys.of(cid).meta)
    report = await reconciled(client, cid)
    assert report.mismatches == [
        "the campaign's meta is missing from Redis (lost?): run `rebuild`",
        "shard 3: sub-pool missing from Redis (lost?): run `rebuild`",
    ]
    result = await operations.rebuild(client.app[REDIS], client.app[PG], cid)
    assert (result.shards, result.meta) == ((3,), True)
    assert result.refunded is not None
    assert "ended and closed out" in result.render()
    assert await redis.hmget(CampaignKeys.of(pools[3]).meta, *lifecycle) == kept
    body: dict[str, Any] = await stats(client, cid)
    assert {**body, "ledger_lag": 0} == {**ended, "ledger_lag": 0}
    assert (await grab(client, tokens[0], cid))[1]["error"] == "ended"
    # No second close-out: the drainers see every sub-pool closed, reconcile agrees.
    await drain(client)
    assert await pg.fetchval("SELECT count(*) FROM closeouts WHERE campaign_id = $1", cid) == 4
    report = await reconciled(client, cid)
    assert report.ok, report.render()
