"""grab_envelope.lua driven through app.store.scripts: codes, amounts and resulting keys.

The script reads Redis's clock (TIME): windows here are set around Redis's own time, and
a private Redis whose clock the test sets (tests.frozen_redis) checks the edges exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.model import Campaign, Kind
from app.redpacket.spec import RedPacketSpec, to_meta
from app.store.scripts import CampaignKeys, GrabCode, GrabStatus, Scripts
from tests.frozen_redis import FrozenRedis

MINUTE = 60_000


async def redis_now(redis: Redis) -> int:
    """Redis's clock, unix milliseconds."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _load(redis: Redis, cid: str, amounts: list[int], starts: int, ends: int) -> None:
    keys = CampaignKeys.of(cid)
    await redis.rpush(keys.pool, *[f"{i}:{a}" for i, a in enumerate(amounts)])
    spec = RedPacketSpec(sum(amounts), len(amounts), 1, None)
    campaign = Campaign(cid, Kind.RED_PACKET, "t", starts, ends, spec)
    await redis.hset(keys.meta, mapping=to_meta(campaign))


@pytest.fixture
def frozen(tmp_path: Path) -> Iterator[FrozenRedis]:
    server = FrozenRedis(tmp_path / "redis", 1_800_000_000_000)
    yield server
    server.stop()


@pytest.fixture
async def frozen_client(frozen: FrozenRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(frozen.url)
    yield client
    await client.aclose()


async def test_batch_with_duplicates_and_sell_out(redis: Redis) -> None:
    scripts = Scripts(redis)
    now = await redis_now(redis)
    await _load(redis, "c1", [5, 7, 11], now - MINUTE, now + MINUTE)
    result = await scripts.grab_envelope("c1", ["a", "b", "a", "c", "d", "b"])
    after = await redis_now(redis)
    assert result.status is GrabStatus.SETTLED
    assert result.remaining_count == 0
    assert now <= result.now_ms <= after
    assert result.outcomes == [
        (GrabCode.WON, 5),
        (GrabCode.WON, 7),
        (GrabCode.ALREADY_WON, 5),
        (GrabCode.WON, 11),
        (GrabCode.SOLD_OUT, 0),
        (GrabCode.ALREADY_WON, 7),
    ]
    keys = CampaignKeys.of("c1")
    assert await redis.hgetall(keys.winners) == {b"a": b"0:5", b"b": b"1:7", b"c": b"2:11"}
    assert await redis.hmget(keys.meta, "won_count", "won_fen") == [b"3", b"23"]
    entries = await redis.xrange(keys.ledger)
    # Every entry carries the time Redis settled the batch at, not a worker's.
    stamp = str(result.now_ms).encode()
    assert [(e[b"u"], e[b"s"], e[b"a"], e[b"t"]) for _, e in entries] == [
        (b"a", b"0", b"5", stamp),
        (b"b", b"1", b"7", stamp),
        (b"c", b"2", b"11", stamp),
    ]
    # A winner grabbing after the sell-out still hears their amount.
    again = await scripts.grab_envelope("c1", ["c", "e"])
    assert again.outcomes == [(GrabCode.ALREADY_WON, 11), (GrabCode.SOLD_OUT, 0)]
    assert await redis.xlen(keys.ledger) == 3


async def test_window_is_redis_s_clock_to_the_millisecond(
    frozen: FrozenRedis, frozen_client: Redis
) -> None:
    scripts = Scripts(frozen_client)
    starts, ends = 1_800_000_001_000, 1_800_000_002_000
    await _load(frozen_client, "c2", [1, 2], starts, ends)
    frozen.now = starts - 1
    early = await scripts.grab_envelope("c2", ["a"])
    frozen.now = ends
    late = await scripts.grab_envelope("c2", ["a"])
    assert (early.status, early.remaining_count, early.now_ms) == (
        GrabStatus.NOT_STARTED,
        2,
        starts - 1,
    )
    assert (late.status, late.remaining_count, late.now_ms) == (GrabStatus.ENDED, 2, ends)
    assert await frozen_client.hlen(CampaignKeys.of("c2").winners) == 0
    frozen.now = starts
    first = await scripts.grab_envelope("c2", ["a"])
    frozen.now = ends - 1
    last = await scripts.grab_envelope("c2", ["b"])
    assert [first.status, last.status] == [GrabStatus.SETTLED, GrabStatus.SETTLED]
    stamps = [e[b"t"] for _, e in await frozen_client.xrange(CampaignKeys.of("c2").ledger)]
    assert stamps == [str(starts).encode(), str(ends - 1).encode()]


async def test_missing_campaign(redis: Redis) -> None:
    missing = await Scripts(redis).grab_envelope("nope", ["a"])
    assert missing.status is GrabStatus.NOT_FOUND
    assert await redis.exists(CampaignKeys.of("nope").winners) == 0


async def test_half_loaded_campaign_is_not_grabbable(redis: Redis) -> None:
    """The pool is pushed before meta is written: no meta means nobody grabs."""
    scripts = Scripts(redis)
    await redis.rpush(CampaignKeys.of("c3").pool, "0:10", "1:20")
    result = await scripts.grab_envelope("c3", ["a"])
    assert result.status is GrabStatus.NOT_FOUND
    assert await redis.llen(CampaignKeys.of("c3").pool) == 2


def test_all_keys_share_the_hash_tag() -> None:
    keys = CampaignKeys.of("abc123")
    for name in (keys.meta, keys.pool, keys.winners, keys.ledger):
        assert name.startswith("hb:{abc123}:")
