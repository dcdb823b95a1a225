"""God-of-Wealth lottery: prize tiers with stock, odds and release schedules, per-player quotas.

Each draw is settled by one call of ``lua/draw_prize.lua`` (quota, stock, pick, win and ledger
record together); concurrent draws of a campaign are coalesced into one script call, each draw
carrying its own randomness from the OS CSPRNG.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from zoneinfo import ZoneInfo

import orjson
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from app.batching import KeyedBatchers
from app.errors import Ended, Invalid, NotFound, NotStarted, QuotaExhausted, WrongKind
from app.scripts import (
    CAMPAIGNS_SET,
    CampaignKeys,
    DrawCode,
    DrawResult,
    DrawStatus,
    Scripts,
    daily_key,
)
from app.validation import get_int, get_optional_int, get_str, get_time_ms, reject_unknown

if TYPE_CHECKING:
    from app.campaigns import Campaign

SHANGHAI = ZoneInfo("Asia/Shanghai")
DEFAULT_FALLBACK = "谢谢参与"
WHEN_OUT = ("renormalise", "fallback")
MAX_TIERS = 32
MAX_SLOTS = 200
MAX_TIER_NAME = 50
MAX_STOCK = 10_000_000
MAX_PRIZE_FEN = 5_000_000_000
MAX_QUOTA = 100_000
# Weights are integers; their total stays below 2^30 so the script's integer pick is exact in
# Lua's doubles and ``rand mod total`` (rand < 2^52) is biased by less than 2^-22.
MAX_TOTAL_WEIGHT = 1_000_000_000
RANDOM_BITS = 52

LOTTERY_FIELDS = {
    "kind",
    "name",
    "starts_at",
    "ends_at",
    "tiers",
    "fallback",
    "no_prize_weight",
    "quota_total",
    "quota_daily",
    "when_out",
}
TIER_FIELDS = {"name", "stock", "weight", "value_fen", "schedule"}
SLOT_FIELDS = {"at", "release"}


def shanghai_day(ms: int) -> int:
    """The calendar day (YYYYMMDD) of a unix-millisecond time in Asia/Shanghai."""
    moment = datetime.fromtimestamp(ms // 1000, SHANGHAI)
    return moment.year * 10_000 + moment.month * 100 + moment.day


@dataclass(frozen=True, slots=True)
class Slot:
    """Stock of a tier released at ``at_ms``."""

    at_ms: int
    release: int


@dataclass(frozen=True, slots=True)
class Tier:
    """One prize tier."""

    name: str
    stock: int
    weight: int
    value_fen: int | None
    schedule: tuple[Slot, ...] | None

    def released(self, now: int) -> int:
        """Stock released by ``now``: all of it without a schedule."""
        if self.schedule is None:
            return self.stock
        return sum(s.release for s in self.schedule if s.at_ms <= now)

    def schedule_field(self) -> str:
        """The schedule as the script reads it: "at_ms:cumulative,..." in time order."""
        if self.schedule is None:
            return ""
        parts, cumulative = [], 0
        for slot in self.schedule:
            cumulative += slot.release
            parts.append(f"{slot.at_ms}:{cumulative}")
        return ",".join(parts)


@dataclass(frozen=True, slots=True)
class LotteryConfig:
    """A validated lottery definition (besides name and window)."""

    tiers: tuple[Tier, ...]
    fallback: str
    no_prize_weight: int
    quota_total: int | None
    quota_daily: int | None
    when_out: str

    def to_json(self) -> dict[str, Any]:
        """The form stored in PostgreSQL (campaigns.config) and the Redis meta hash."""
        return {
            "tiers": [
                {
                    "name": t.name,
                    "stock": t.stock,
                    "weight": t.weight,
                    "value_fen": t.value_fen,
                    "schedule": None
                    if t.schedule is None
                    else [{"at_ms": s.at_ms, "release": s.release} for s in t.schedule],
                }
                for t in self.tiers
            ],
            "fallback": self.fallback,
            "no_prize_weight": self.no_prize_weight,
            "quota_total": self.quota_total,
            "quota_daily": self.quota_daily,
            "when_out": self.when_out,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LotteryConfig:
        """Inverse of ``to_json``."""
        tiers = tuple(
            Tier(
                name=t["name"],
                stock=t["stock"],
                weight=t["weight"],
                value_fen=t["value_fen"],
                schedule=None
                if t["schedule"] is None
                else tuple(Slot(s["at_ms"], s["release"]) for s in t["schedule"]),
            )
            for t in data["tiers"]
        )
        return cls(
            tiers=tiers,
            fallback=data["fallback"],
            no_prize_weight=data["no_prize_weight"],
            quota_total=data["quota_total"],
            quota_daily=data["quota_daily"],
            when_out=data["when_out"],
        )

    def redis_meta(self) -> dict[FieldT, EncodableT]:
        """Fields the draw script reads from the meta hash (0 means no cap)."""
        return {
            "tier_count": len(self.tiers),
            "no_prize_weight": self.no_prize_weight,
            "quota_total": self.quota_total or 0,
            "quota_daily": self.quota_daily or 0,
            "when_out": self.when_out,
            "config": orjson.dumps(self.to_json()),
        }

    def redis_tiers(self) -> dict[FieldT, EncodableT]:
        """The tiers hash: static definition per tier and zeroed won counters."""
        fields: dict[FieldT, EncodableT] = {}
        for i, tier in enumerate(self.tiers):
            fields[f"weight:{i}"] = tier.weight
            fields[f"stock:{i}"] = tier.stock
            fields[f"value:{i}"] = tier.value_fen or 0
            fields[f"schedule:{i}"] = tier.schedule_field()
            fields[f"won:{i}"] = 0
        return fields

    def prize(self, tier: int) -> dict[str, Any]:
        """What a player sees of a prize tier."""
        t = self.tiers[tier]
        return {"tier": tier, "name": t.name, "value_fen": t.value_fen}


@dataclass(frozen=True, slots=True)
class LotteryDraft:
    """A validated lottery definition, before it has an id."""

    name: str
    starts_at_ms: int | None
    ends_at_ms: int | None
    config: LotteryConfig


@contextmanager
def _within(prefix: str) -> Iterator[None]:
    """Prefix the field named by an Invalid raised inside (``tiers[1]`` + ``stock``)."""
    try:
        yield
    except Invalid as exc:
        field = f"{prefix}.{exc.extra['field']}"
        raise Invalid(field, f"{prefix}: {exc.message}") from None


def _object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(field, f"{field} must be an object")
    return cast(Mapping[str, Any], value)


def _list(value: Any, field: str, *, most: int) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise Invalid(field, f"{field} must be a non-empty array")
    if len(value) > most:
        raise Invalid(field, f"{field} may have at most {most} entries")
    return value


def _parse_schedule(
    raw: Any, field: str, stock: int, starts: int | None, ends: int | None
) -> tuple[Slot, ...]:
    slots: list[Slot] = []
    for j, item in enumerate(_list(raw, field, most=MAX_SLOTS)):
        at_field = f"{field}[{j}]"
        slot = _object(item, at_field)
        with _within(at_field):
            reject_unknown(slot, SLOT_FIELDS)
            at = get_time_ms(slot, "at")
            if at is None:
                raise Invalid("at", "at is required")
            release = get_int(slot, "release", minimum=1, maximum=MAX_STOCK)
            if slots and at <= slots[-1].at_ms:
                raise Invalid("at", "slot times must be strictly increasing (no duplicates)")
            if starts is not None and at < starts:
                raise Invalid("at", "slot is before the campaign's starts_at")
            if ends is not None and at >= ends:
                raise Invalid("at", "slot is at or after the campaign's ends_at")
        slots.append(Slot(at, release))
    released = sum(s.release for s in slots)
    if released != stock:
        raise Invalid(field, f"{field}: releases sum to {released}, must equal stock {stock}")
    return tuple(slots)


def _parse_tier(raw: Any, field: str, starts: int | None, ends: int | None) -> Tier:
    data = _object(raw, field)
    with _within(field):
        reject_unknown(data, TIER_FIELDS)
        name = get_str(data, "name", max_len=MAX_TIER_NAME)
        stock = get_int(data, "stock", minimum=0, maximum=MAX_STOCK)
        weight = get_int(data, "weight", minimum=0, maximum=MAX_TOTAL_WEIGHT)
        value = get_optional_int(data, "value_fen", minimum=1, maximum=MAX_PRIZE_FEN)
    raw_schedule = data.get("schedule")
    schedule = (
        None
        if raw_schedule is None
        else _parse_schedule(raw_schedule, f"{field}.schedule", stock, starts, ends)
    )
    return Tier(name, stock, weight, value, schedule)


def parse_lottery(data: Mapping[str, Any]) -> LotteryDraft:
    """Validate a lottery definition; 422 naming the first bad field (``tiers[1].stock``)."""
    reject_unknown(data, LOTTERY_FIELDS)
    name = get_str(data, "name", max_len=100)
    starts = get_time_ms(data, "starts_at")
    ends = get_time_ms(data, "ends_at")
    if starts is not None and ends is not None and ends <= starts:
        raise Invalid("ends_at", "ends_at must be after starts_at")
    tiers = tuple(
        _parse_tier(raw, f"tiers[{i}]", starts, ends)
        for i, raw in enumerate(_list(data.get("tiers"), "tiers", most=MAX_TIERS))
    )
    fallback = DEFAULT_FALLBACK
    if data.get("fallback") is not None:
        fallback = get_str(data, "fallback", max_len=MAX_TIER_NAME)
    no_prize_weight = get_int(
        data, "no_prize_weight", minimum=0, maximum=MAX_TOTAL_WEIGHT, default=0
    )
    total_weight = no_prize_weight + sum(t.weight for t in tiers)
    if total_weight == 0:
        raise Invalid("tiers", "the weights of the tiers and no_prize_weight sum to 0")
    if total_weight > MAX_TOTAL_WEIGHT:
        raise Invalid("tiers", f"the weights must sum to at most {MAX_TOTAL_WEIGHT}")
    # Absent means one draw per player; null means no lifetime cap (then a daily one is needed).
    quota_total = get_optional_int(data, "quota_total", minimum=1, maximum=MAX_QUOTA)
    if "quota_total" not in data:
        quota_total = 1
    quota_daily = get_optional_int(data, "quota_daily", minimum=1, maximum=MAX_QUOTA)
    if quota_total is None and quota_daily is None:
        raise Invalid("quota_total", "set quota_total, quota_daily or both")
    if quota_total is not None and quota_daily is not None and quota_daily > quota_total:
        raise Invalid("quota_daily", "quota_daily must not exceed quota_total")
    when_out = data.get("when_out", "renormalise")
    if when_out not in WHEN_OUT:
        raise Invalid("when_out", "when_out must be 'renormalise' or 'fallback'")
    config = LotteryConfig(tiers, fallback, no_prize_weight, quota_total, quota_daily, when_out)
    return LotteryDraft(name, starts, ends, config)


@dataclass(frozen=True, slots=True)
class DrawOutcome:
    """One accepted draw, ready to render."""

    result: DrawResult
    config: LotteryConfig

    def to_json(self) -> dict[str, Any]:
        """The player's answer."""
        if self.result.code is DrawCode.PRIZE:
            return {
                "result": "prize",
                "prize": self.config.prize(self.result.tier),
                "draw_no": self.result.draw_no,
            }
        return {"result": "no_prize", "name": self.config.fallback, "draw_no": self.result.draw_no}


def _ints(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


class LotteryService:
    """Loading lotteries into Redis, draws, and their player and operator views."""

    def __init__(
        self, redis: Redis, scripts: Scripts, *, batch_max: int, clock: Callable[[], int]
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        # Unix milliseconds; tests substitute a clock to cross day and slot boundaries.
        self._clock = clock
        self._configs: dict[str, LotteryConfig] = {}
        self._draws: KeyedBatchers[str, tuple[DrawStatus, DrawResult]] = KeyedBatchers(
            self._settle, max_size=batch_max
        )

    def config(self, campaign: Campaign) -> LotteryConfig:
        """The parsed lottery definition of ``campaign`` (cached; definitions never change)."""
        config = self._configs.get(campaign.id)
        if config is None:
            if campaign.kind != "lottery":
                raise WrongKind("this campaign is not a lottery; grab it instead")
            config = LotteryConfig.from_json(campaign.config)
            self._configs[campaign.id] = config
        return config

    async def load(self, campaign: Campaign, meta: dict[FieldT, EncodableT]) -> None:
        """Write tiers, then meta (its presence opens the campaign), in one transaction."""
        config = self.config(campaign)
        keys = CampaignKeys.of(campaign.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.tiers, mapping=config.redis_tiers())
            pipe.hset(keys.meta, mapping={**meta, **config.redis_meta()})
            pipe.sadd(CAMPAIGNS_SET, campaign.id)
            await pipe.execute()

    async def draw(self, campaign: Campaign, openid: str) -> DrawOutcome:
        """Settle one draw of ``openid`` (the caller checked the window); raises on quota or kind.

        The script re-checks the window atomically.
        """
        config = self.config(campaign)
        status, result = await self._draws.submit(campaign.id, openid)
        if status is DrawStatus.NOT_FOUND:
            raise NotFound("no such campaign")
        if status is DrawStatus.NOT_STARTED:
            raise NotStarted("the campaign has not started yet")
        if status is DrawStatus.ENDED:
            raise Ended("the campaign has ended")
        if status is DrawStatus.WRONG_KIND:
            raise WrongKind("this campaign is not a lottery")
        if result.code is DrawCode.QUOTA_TOTAL:
            raise QuotaExhausted("you have used all your draws", scope="total")
        if result.code is DrawCode.QUOTA_DAILY:
            raise QuotaExhausted("you have used today's draws; come back tomorrow", scope="daily")
        return DrawOutcome(result, config)

    async def _settle(
        self, campaign_id: str, users: list[str]
    ) -> list[tuple[DrawStatus, DrawResult]]:
        # The batch is settled at one instant: its clock reading decides the quota day.
        now = self._clock()
        draws = [(user, secrets.randbits(RANDOM_BITS)) for user in users]
        status, results = await self._scripts.draw_prize(campaign_id, now, shanghai_day(now), draws)
        if status is not DrawStatus.SETTLED:
            refused = DrawResult(DrawCode.NO_PRIZE, -1, 0)
            return [(status, refused)] * len(users)
        return [(status, result) for result in results]

    def public_fields(self, campaign: Campaign) -> dict[str, Any]:
        """Player-facing definition: prize names and values, quotas (no stock or odds)."""
        config = self.config(campaign)
        return {
            "prizes": [config.prize(i) for i in range(len(config.tiers))],
            "fallback": config.fallback,
            "quota_total": config.quota_total,
            "quota_daily": config.quota_daily,
        }

    async def player_view(self, campaign: Campaign, openid: str) -> dict[str, Any]:
        """A player's draws (in total and today) and prizes."""
        config = self.config(campaign)
        keys = CampaignKeys.of(campaign.id)
        day = shanghai_day(self._clock())
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.draws, openid)
            pipe.hget(daily_key(campaign.id, day), openid)
            pipe.hget(keys.wins, openid)
            draws, today, wins = await pipe.execute()
        prizes = []
        for entry in (wins or b"").decode().split(","):
            if entry:
                draw_no, tier = entry.split(":")
                prizes.append({"draw_no": int(draw_no), **config.prize(int(tier))})
        return {
            "result": "prizes" if prizes else "none",
            "draws": int(draws or 0),
            "draws_today": int(today or 0),
            "quota_total": config.quota_total,
            "quota_daily": config.quota_daily,
            "prizes": prizes,
        }

    async def stats(self, campaign: Campaign) -> dict[str, Any]:
        """Operator view: per tier stock, released (now), won and left; draws per day."""
        config = self.config(campaign)
        now = self._clock()
        keys = CampaignKeys.of(campaign.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.tiers)
            pipe.hgetall(keys.days)
            # Drainers XDEL what they commit: the stream holds exactly the unrecorded draws.
            pipe.xlen(keys.ledger)
            tiers_raw, days_raw, ledger_lag = await pipe.execute()
        counters = _ints({k: v for k, v in tiers_raw.items() if k.startswith(b"won:")})
        days = _ints(days_raw)
        tiers = []
        for i, tier in enumerate(config.tiers):
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
        return {
            **config.to_json(),
            "tiers": tiers,
            "draws": sum(per_day.values()),
            "prizes_won": sum(t["won"] for t in tiers),
            "draws_per_day": per_day,
            "prizes_per_day": {d: days.get(f"won:{d}", 0) for d in per_day},
            "ledger_lag": int(ledger_lag),
        }

    async def drain(self) -> None:
        """Finish draws in flight (graceful shutdown)."""
        await self._draws.drain()
