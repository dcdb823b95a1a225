"""grab_envelope.lua driven through app.store.scripts: codes, amounts and resulting keys."""

from __future__ import annotations

from redis.asyncio import Redis

from app.model import Campaign, Kind
from app.redpacket.spec import RedPacketSpec, to_meta
from app.store.scripts import CampaignKeys, GrabCode, GrabStatus, Scripts


async def _load(redis: Redis, cid: str, amounts: list[int], starts: int, ends: int) -> None:
    keys = CampaignKeys.of(cid)
    await redis.rpush(keys.pool, *[f"{i}:{a}" for i, a in enumerate(amounts)])
    spec = RedPacketSpec(sum(amounts), len(amounts), 1, None)
    campaign = Campaign(cid, Kind.RED_PACKET, "t", starts, ends, spec)
    await redis.hset(keys.meta, mapping=to_meta(campaign))


async def test_batch_with_duplicates_and_sell_out(redis: Redis) -> None:
    scripts = Scripts(redis)
    await _load(redis, "c1", [5, 7, 11], 1_000, 2_000)
    result = await scripts.grab_envelope("c1", ["a", "b", "a", "c", "d", "b"], 1_500)
    assert result.status is GrabStatus.SETTLED
    assert result.remaining_count == 0
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
    assert [(e[b"u"], e[b"s"], e[b"a"], e[b"t"]) for _, e in entries] == [
        (b"a", b"0", b"5", b"1500"),
        (b"b", b"1", b"7", b"1500"),
        (b"c", b"2", b"11", b"1500"),
    ]
    # A winner grabbing after the sell-out still hears their amount.
    again = await scripts.grab_envelope("c1", ["c", "e"], 1_600)
    assert again.outcomes == [(GrabCode.ALREADY_WON, 11), (GrabCode.SOLD_OUT, 0)]
    assert await redis.xlen(keys.ledger) == 3


async def test_window_and_missing_campaign(redis: Redis) -> None:
    scripts = Scripts(redis)
    await _load(redis, "c2", [1, 2], 1_000, 2_000)
    early = await scripts.grab_envelope("c2", ["a"], 999)
    late = await scripts.grab_envelope("c2", ["a"], 2_000)
    missing = await scripts.grab_envelope("nope", ["a"], 1_500)
    assert (early.status, early.remaining_count) == (GrabStatus.NOT_STARTED, 2)
    assert (late.status, late.remaining_count) == (GrabStatus.ENDED, 2)
    assert missing.status is GrabStatus.NOT_FOUND
    assert await redis.hlen(CampaignKeys.of("c2").winners) == 0
    assert await redis.exists(CampaignKeys.of("nope").winners) == 0


async def test_half_loaded_campaign_is_not_grabbable(redis: Redis) -> None:
    """The pool is pushed before meta is written: no meta means nobody grabs."""
    scripts = Scripts(redis)
    await redis.rpush(CampaignKeys.of("c3").pool, "0:10", "1:20")
    result = await scripts.grab_envelope("c3", ["a"], 1_500)
    assert result.status is GrabStatus.NOT_FOUND
    assert await redis.llen(CampaignKeys.of("c3").pool) == 2


def test_all_keys_share_the_hash_tag() -> None:
    keys = CampaignKeys.of("abc123")
    for name in (keys.meta, keys.pool, keys.winners, keys.ledger):
        assert name.startswith("hb:{abc123}:")
