"""God-of-Wealth lotteries at run time: creation, draws, and the player and operator views.

Each draw is settled by one call of ``lua/draw_prize.lua`` (quota, stock, pick, win and
ledger record together); concurrent draws of a campaign are coalesced into one script
call, each draw carrying its own randomness from the OS CSPRNG.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import asyncpg
from redis.asyncio import Redis

from app.errors import Ended, NotFound, NotStarted, Paused, QuotaExhausted, WrongKind
from app.lottery.spec import RANDOM_BITS, Lottery, LotterySpec, parse, to_meta
from app.model import Lifecycle, new_campaign_id, shanghai_day
from app.records import LIFECYCLE_FIELDS, decode_leftovers, decode_wins, lifecycle_of
from app.reports import Phase, Progress, quiet
from app.store import ledger
from app.store.batching import KeyedBatchers
from app.store.client import clock_ms, cluster_of
from app.store.scripts import (
    CAMPAIGNS_SET,
    CampaignKeys,
    Draw,
    DrawCode,
    DrawResult,
    DrawStatus,
    RedisClock,
    Scripts,
    daily_key,
)

log = logging.getLogger("hongbao.lottery")


# Each draw's randomness: RANDOM_BITS of its own RANDOM_BYTES of the batch's.
RANDOM_BYTES = (RANDOM_BITS + 7) // 8
RANDOM_MASK = (1 << RANDOM_BITS) - 1


class DrawOutcome(NamedTuple):
    """One accepted draw, ready to render."""

    result: DrawResult
    spec: LotterySpec

    def to_json(self) -> dict[str, Any]:
        """The player's answer."""
        if self.result.code is DrawCode.PRIZE:
            return {
                "result": "prize",
                "prize": self.spec.prize(self.result.tier),
                "draw_no": self.result.draw_no,
            }
        return {"result": "no_prize", "name": self.spec.fallback, "draw_no": self.result.draw_no}


def _ints(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


class Lotteries:
    """Creating lotteries, settling draws (coalesced per campaign), and their views."""

    def __init__(
        self,
        redis: Redis,
        pg: asyncpg.Pool,
        scripts: Scripts,
        *,
        batch_max: int,
        clock: RedisClock | None = None,
    ) -> None:
        self._redis = redis
        self._pg = pg
        self._scripts = scripts
        # Redis's clock as last seen, for views and the day's key; the script decides.
        self._clock = clock or RedisClock()
        self._draws: KeyedBatchers[tuple[str, str | None], tuple[DrawStatus, DrawResult]] = (
            KeyedBatchers(self._settle, max_size=batch_max)
        )

    async def create(self, data: Mapping[str, Any], progress: Progress | None = None) -> Lottery:
        """Validate, record in PostgreSQL, then load into Redis and open; all or nothing:
        a failed load removes the recorded definition again. ``progress`` counts tiers."""
        campaign = parse(data, new_campaign_id())
        tiers = len(campaign.spec.tiers)
        step = progress or quiet
        step(Phase.POSTGRESQL, 0, tiers)
        await ledger.insert_campaign(self._pg, campaign, config=campaign.spec.to_json())
        step(Phase.POSTGRESQL, tiers, tiers)
        try:
            step(Phase.REDIS, 0, tiers)
            await self.load(campaign)
            step(Phase.REDIS, tiers, tiers)
        except BaseException:
            await self._discard(campaign.id)
            raise
        return campaign

    async def _discard(self, campaign_id: str) -> None:
        """Undo a failed creation in both stores, as far as each answers (the load is one
        MULTI, so Redis holds all of it or none)."""
        keys = CampaignKeys.of(campaign_id)
        try:
            # Apart: the list has its own slot on a Redis Cluster.
            await self._redis.delete(keys.meta, keys.tiers)
            await self._redis.srem(CAMPAIGNS_SET, campaign_id)
        except Exception as exc:
            log.warning("failed lottery %s not removed from Redis: %s", campaign_id, exc)
        try:
            await ledger.discard_campaign(self._pg, campaign_id)
        except Exception as exc:
            log.warning("failed lottery %s not removed from PostgreSQL: %s", campaign_id, exc)

    async def load(self, campaign: Lottery) -> None:
        """List the campaign for the drainers (apart: the list has its own slot on a Redis
        Cluster), then write tiers and meta (its presence opens it) in one transaction."""
        keys = CampaignKeys.of(campaign.id)
        await self._redis.sadd(CAMPAIGNS_SET, campaign.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.tiers, mapping=campaign.spec.redis_tiers())
            pipe.hset(keys.meta, mapping=to_meta(campaign))
            await pipe.execute()

    async def draw(
        self, campaign: Lottery, openid: str, idempotency_key: str | None = None
    ) -> DrawOutcome:
        """Settle one draw of ``openid`` (the caller checked the window); raises on quota.

        The script re-checks the window atomically, by Redis's clock. A draw whose
        ``idempotency_key`` was already drawn with answers that draw again.
        """
        status, result = await self._draws.submit(campaign.id, (openid, idempotency_key))
        if status is DrawStatus.NOT_FOUND:
            raise NotFound("no such campaign")
        if status is DrawStatus.NOT_STARTED:
            raise NotStarted("the campaign has not started yet")
        if status is DrawStatus.ENDED:
            raise Ended("the campaign has ended")
        if status is DrawStatus.WRONG_KIND:
            raise WrongKind("this campaign is not a lottery")
        if status is DrawStatus.PAUSED:
            raise Paused("the campaign is paused; try again later")
        if result.code is DrawCode.QUOTA_TOTAL:
            raise QuotaExhausted("you have used all your draws", scope="total")
        if result.code is DrawCode.QUOTA_DAILY:
            raise QuotaExhausted("you have used today's draws; come back tomorrow", scope="daily")
        return DrawOutcome(result, campaign.spec)

    async def _settle(
        self, campaign_id: str, users: list[tuple[str, str | None]]
    ) -> list[tuple[DrawStatus, DrawResult]]:
        # The batch is settled at one instant of Redis's clock, which decides the quota
        # day; the day guessed here only names the key, and Redis corrects a wrong guess.
        # One read of the system's randomness for the batch, not one per draw.
        pool = int.from_bytes(secrets.token_bytes(RANDOM_BYTES * len(users)), "big")
        draws = [
            Draw(user, (pool >> (RANDOM_BYTES * 8 * i)) & RANDOM_MASK, key)
            for i, (user, key) in enumerate(users)
        ]
        batch = await self._scripts.draw_prize(campaign_id, shanghai_day(self._clock()), draws)
        self._clock.observe(batch.now_ms)
        if batch.status is not DrawStatus.SETTLED:
            refused = DrawResult(DrawCode.NO_PRIZE, -1, 0)
            return [(batch.status, refused)] * len(users)
        return [(batch.status, result) for result in batch.results]

    async def public_view(self, campaign: Lottery, life: Lifecycle) -> dict[str, Any]:
        """Player-facing definition: prize names and values, quotas (no stock or odds);
        ``life`` as this worker knows it."""
        spec = campaign.spec
        return {
            **campaign.summary(campaign.state(self._clock(), None, life)),
            "prizes": [spec.prize(i) for i in range(len(spec.tiers))],
            "fallback": spec.fallback,
            "quota_total": spec.quota_total,
            "quota_daily": spec.quota_daily,
        }

    async def player_view(self, campaign: Lottery, openid: str) -> dict[str, Any]:
        """A player's draws (in total and today) and prizes."""
        spec = campaign.spec
        keys = CampaignKeys.of(campaign.id)
        day = shanghai_day(self._clock())
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.draws, openid)
            pipe.hget(daily_key(campaign.id, day), openid)
            pipe.hget(keys.wins, openid)
            draws, today, wins = await pipe.execute()
        prizes = [{"draw_no": n, **spec.prize(tier)} for n, tier in decode_wins(wins)]
        return {
            "result": "prizes" if prizes else "none",
            "draws": int(draws or 0),
            "draws_today": int(today or 0),
            "quota_total": spec.quota_total,
            "quota_daily": spec.quota_daily,
            "prizes": prizes,
        }

    async def stats(self, campaign: Lottery) -> dict[str, Any]:
        """Operator view: per tier stock, released (now), won and left; draws per day; the
        lifecycle as Redis has it and, once closed out, each tier's leftovers."""
        meta = cast(
            list[bytes | None],
            await self._redis.hmget(
                CampaignKeys.of(campaign.id).meta, *LIFECYCLE_FIELDS, "closeout"
            ),
        )
        spec = campaign.spec
        keys = CampaignKeys.of(campaign.id)
        cluster = cluster_of(self._redis) is not None
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.tiers)
            pipe.hgetall(keys.days)
            # Drainers XDEL what they commit: the stream holds exactly the unrecorded draws.
            pipe.xlen(keys.ledger)
            # "Released" by the clock the script releases by, at the same instant (on a
            # cluster, whose MULTI refuses TIME, the same node's clock just after).
            if not cluster:
                pipe.time()
            tiers_raw, days_raw, ledger_lag, *clock = await pipe.execute()
        if clock:
            seconds, micros = clock[0]
            now = seconds * 1000 + micros // 1000
        else:
            now = await clock_ms(self._redis, keys.meta)
        counters = _ints({k: v for k, v in tiers_raw.items() if k.startswith(b"won:")})
        days = _ints(days_raw)
        tiers = []
        for i, tier in enumerate(spec.tiers):
            released = tier.released(now)
            won = counters.get(f"won:{i}", 0)
            tiers.append(
                {
                    "tier": i,
                    "name": tier.name,
                    "value_fen": tier.value_fen,
                    "weight": tier.weight,
                    "stock": tier.stock,
                    "released": released,
                    "won": won,
                    "left": released - won,
                }
            )
        per_day = {d: n for d, n in sorted(days.items()) if not d.startswith("won:")}
        closeout = {}
        if meta[-1] is not None:
            closeout["closeout"] = [
                {"tier": i, "unreleased": t.unreleased, "unwon": t.unwon}
                for i, t in enumerate(decode_leftovers(meta[-1]))
            ]
        return {
            **campaign.summary(campaign.state(now, None, lifecycle_of(meta[:-1]))),
            **spec.to_json(),
            "tiers": tiers,
            "draws": sum(per_day.values()),
            "prizes_won": sum(t["won"] for t in tiers),
            "draws_per_day": per_day,
            "prizes_per_day": {d: days.get(f"won:{d}", 0) for d in per_day},
            "ledger_lag": int(ledger_lag),
            **closeout,
        }

    async def drain(self) -> None:
        """Finish draws in flight (graceful shutdown)."""
        await self._draws.drain()
