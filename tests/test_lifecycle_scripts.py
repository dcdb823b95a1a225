"""set_paused.lua and close_campaign.lua driven through app.store.scripts, and the
settlement scripts' answers once a campaign is paused or closed out."""

from __future__ import annotations

from redis.asyncio import Redis

from app.lottery.spec import LotterySpec, Slot, Tier
from app.lottery.spec import to_meta as lottery_meta
from app.model import Campaign, Kind
from app.redpacket.spec import RedPacketSpec, to_meta
from app.store.scripts import (
    CampaignKeys,
    CloseStatus,
    Draw,
    DrawStatus,
    GrabCode,
    GrabStatus,
    PauseStatus,
    Scripts,
)
from tests.test_scripts import MINUTE, redis_now


async def _packet(redis: Redis, cid: str, amounts: list[int], starts: int, ends: int) -> None:
    keys = CampaignKeys.of(cid)
    await redis.rpush(keys.pool, *[f"{i}:{a}" for i, a in enumerate(amounts)])
    spec = RedPacketSpec(sum(amounts), len(amounts), 1, None)
    await redis.hset(
        keys.meta, mapping=to_meta(Campaign(cid, Kind.RED_PACKET, "t", starts, ends, spec))
    )


async def _lottery(redis: Redis, cid: str, tiers: tuple[Tier, ...], starts: int, ends: int) -> str:
    spec = LotterySpec(tiers, "谢谢参与", 0, None, 100, "renormalise")
    keys = CampaignKeys.of(cid)
    await redis.hset(keys.tiers, mapping=spec.redis_tiers())
    campaign = Campaign(cid, Kind.LOTTERY, "l", starts, ends, spec)
    await redis.hset(keys.meta, mapping=lottery_meta(campaign))
    return cid


async def _entries(redis: Redis, cid: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await redis.xrange(CampaignKeys.of(cid).ledger)]


async def test_pause_refuses_grabs_until_resumed_each_change_recorded_once(redis: Redis) -> None:
    scripts = Scripts(redis)
    now = await redis_now(redis)
    await _packet(redis, "p", [5, 7, 11], now - MINUTE, now + MINUTE)
    assert (await scripts.set_paused("p", True))[0] is PauseStatus.CHANGED
    assert (await scripts.set_paused("p", True))[0] is PauseStatus.UNCHANGED
    paused = await scripts.grab_envelope("p", ["a", "b"])
    assert (paused.status, paused.remaining_count, paused.outcomes) == (GrabStatus.PAUSED, 3, [])
    assert await redis.hlen(CampaignKeys.of("p").winners) == 0
    assert (await scripts.set_paused("p", False))[0] is PauseStatus.CHANGED
    assert (await scripts.set_paused("p", False))[0] is PauseStatus.UNCHANGED
    again = await scripts.grab_envelope("p", ["a"])
    assert again.status is GrabStatus.SETTLED
    assert again.outcomes[0][0] is GrabCode.WON
    entries = await _entries(redis, "p")
    assert [(e[b"k"], e[b"p"]) for e in entries[:2]] == [(b"pause", b"1"), (b"pause", b"0")]
    assert len(entries) == 3  # the two changes, then the grant
    assert (await scripts.set_paused("nope", True))[0] is PauseStatus.NOT_FOUND


async def test_end_closes_out_once_and_refuses_everything_after(redis: Redis) -> None:
    scripts = Scripts(redis)
    now = await redis_now(redis)
    await _packet(redis, "e", [5, 7, 11, 13], now - MINUTE, now + MINUTE)
    won = await scripts.grab_envelope("e", ["a"])
    first_fen = won.outcomes[0][1]
    assert (await scripts.close_campaign("e", end_now=False)).status is CloseStatus.NOT_ENDED
    closed = await scripts.close_campaign("e", end_now=True)
    assert closed.status is CloseStatus.CLOSED
    assert closed.ends_at_ms == closed.now_ms
    again = await scripts.close_campaign("e", end_now=True)
    assert (again.status, again.ends_at_ms) == (CloseStatus.ALREADY_CLOSED, closed.ends_at_ms)
    assert (await scripts.grab_envelope("e", ["b"])).status is GrabStatus.ENDED
    assert (await scripts.set_paused("e", True))[0] is PauseStatus.ENDED
    meta = await redis.hgetall(CampaignKeys.of("e").meta)
    assert int(meta[b"refunded_count"]) == 3
    assert int(meta[b"refunded_fen"]) + first_fen == 36
    assert int(meta[b"ends_at_ms"]) == closed.ends_at_ms
    refunds = [e for e in await _entries(redis, "e") if e.get(b"k") == b"refund"]
    assert refunds == [
        {
            b"k": b"refund",
            b"c": b"3",
            b"a": str(36 - first_fen).encode(),
            b"e": str(closed.ends_at_ms).encode(),
            b"t": str(closed.now_ms).encode(),
        }
    ]
    # A campaign ended before it started is ended, not "not started".
    await _packet(redis, "s", [5], now + MINUTE, now + 2 * MINUTE)
    assert (await scripts.close_campaign("s", end_now=True)).status is CloseStatus.CLOSED
    assert (await scripts.grab_envelope("s", ["a"])).status is GrabStatus.ENDED
    assert (await scripts.close_campaign("nope", end_now=True)).status is CloseStatus.NOT_FOUND


async def test_natural_end_is_closed_out_without_moving_the_end(redis: Redis) -> None:
    scripts = Scripts(redis)
    now = await redis_now(redis)
    await _packet(redis, "n", [5, 7], now - 2 * MINUTE, now - MINUTE)
    closed = await scripts.close_campaign("n", end_now=False)
    assert (closed.status, closed.ends_at_ms) == (CloseStatus.CLOSED, now - MINUTE)
    meta = await redis.hgetall(CampaignKeys.of("n").meta)
    assert (meta[b"refunded_count"], meta[b"refunded_fen"]) == (b"2", b"12")
    assert int(meta[b"ends_at_ms"]) == now - MINUTE


async def test_lottery_pause_and_close_out_per_tier(redis: Redis) -> None:
    scripts = Scripts(redis)
    now = await redis_now(redis)
    tiers = (
        Tier("a", 3, 1, 100, None),
        Tier("b", 4, 0, None, (Slot(now - MINUTE, 1), Slot(now + MINUTE, 3))),
    )
    cid = await _lottery(redis, "l", tiers, now - 2 * MINUTE, now + 2 * MINUTE)
    draws = [Draw("u", 0)]
    assert (await scripts.set_paused(cid, True))[0] is PauseStatus.CHANGED
    day = (await scripts.draw_prize(cid, 0, draws)).day
    assert (await scripts.draw_prize(cid, day, draws)).status is DrawStatus.PAUSED
    assert (await scripts.set_paused(cid, False))[0] is PauseStatus.CHANGED
    drawn = await scripts.draw_prize(cid, day, draws)
    assert drawn.status is DrawStatus.SETTLED
    assert drawn.results[0].tier == 0
    closed = await scripts.close_campaign(cid, end_now=True)
    assert closed.status is CloseStatus.CLOSED
    assert (await scripts.draw_prize(cid, day, draws)).status is DrawStatus.ENDED
    meta = await redis.hgetall(CampaignKeys.of(cid).meta)
    # tier a: all released, 1 won; tier b: the later slot (3) never released, 1 unwon
    assert meta[b"closeout"] == b"0:2,3:1,"
    leftover = [e for e in await _entries(redis, cid) if e.get(b"k") == b"leftover"]
    assert [e[b"r"] for e in leftover] == [b"0:2,3:1,"]
