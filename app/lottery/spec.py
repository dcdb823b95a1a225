"""A lottery's definition: prize tiers with stock, odds and release schedules, per-player
quotas; how it is validated, stored in Redis and PostgreSQL, and read back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
import orjson

from app.errors import Invalid
from app.model import Campaign, Kind, optional_ms
from app.records import MalformedRecord, Meta, decode_meta_common, encode_meta
from app.validation import VISIBLE_TEXT, Timestamp, convert, optional_time_ms, time_ms

DEFAULT_FALLBACK = "谢谢参与"
MAX_NAME_LEN = 100
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

Stock = Annotated[int, msgspec.Meta(ge=0, le=MAX_STOCK)]
Weight = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOTAL_WEIGHT)]
Quota = Annotated[int, msgspec.Meta(ge=1, le=MAX_QUOTA)]
TierName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_TIER_NAME, pattern=VISIBLE_TEXT)
]
WhenOut = Literal["renormalise", "fallback"]


class SlotDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``release`` more of a tier's stock at ``at``: strictly after the tier's previous
    slot, within ``[starts_at, ends_at)``."""

    at: Timestamp
    release: Annotated[int, msgspec.Meta(ge=1, le=MAX_STOCK)]


class TierDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A prize tier; its odds are ``weight`` over the total weight; a schedule's
    releases sum to ``stock`` (no schedule: all of it at the start)."""

    name: TierName
    stock: Stock
    weight: Weight
    value_fen: Annotated[int, msgspec.Meta(ge=1, le=MAX_PRIZE_FEN)] | None = None
    schedule: (
        Annotated[list[SlotDefinition], msgspec.Meta(min_length=1, max_length=MAX_SLOTS)] | None
    ) = None


class LotteryDefinition(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="lottery"
):
    """A lottery (抽奖): prize tiers drawn by weight, with per-player quotas. The weights
    of all tiers and ``no_prize_weight`` sum to 1 - 1,000,000,000; at least one quota is
    set (``quota_total`` absent is 1, null is no lifetime cap); ``quota_daily`` (per day
    in Asia/Shanghai) is at most ``quota_total``."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LEN, pattern=VISIBLE_TEXT)]
    starts_at: Timestamp | None = None
    ends_at: Annotated[Timestamp | None, msgspec.Meta(description="after starts_at")] = None
    tiers: Annotated[list[TierDefinition], msgspec.Meta(min_length=1, max_length=MAX_TIERS)]
    fallback: TierName | None = None
    no_prize_weight: Weight | None = 0
    quota_total: Quota | None = 1
    quota_daily: Quota | None = None
    when_out: WhenOut = "renormalise"


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
class LotterySpec:
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
    def from_json(cls, data: Mapping[str, Any]) -> LotterySpec:
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

    def redis_meta(self) -> Meta:
        """Fields the draw script reads from the meta hash (0 means no cap)."""
        return {
            "tier_count": len(self.tiers),
            "no_prize_weight": self.no_prize_weight,
            "quota_total": self.quota_total or 0,
            "quota_daily": self.quota_daily or 0,
            "when_out": self.when_out,
            "config": orjson.dumps(self.to_json()),
        }

    def redis_tiers(self) -> Meta:
        """The tiers hash: static definition per tier and zeroed won counters."""
        fields: Meta = {}
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


def _schedule(
    slots: list[SlotDefinition], field: str, stock: int, starts: int | None, ends: int | None
) -> tuple[Slot, ...]:
    schedule: list[Slot] = []
    for j, slot in enumerate(slots):
        at_field = f"{field}[{j}].at"
        at = time_ms(slot.at, at_field)
        if schedule and at <= schedule[-1].at_ms:
            raise Invalid(at_field, "slot times must be strictly increasing (no duplicates)")
        if starts is not None and at < starts:
            raise Invalid(at_field, "slot is before the campaign's starts_at")
        if ends is not None and at >= ends:
            raise Invalid(at_field, "slot is at or after the campaign's ends_at")
        schedule.append(Slot(at, slot.release))
    released = sum(s.release for s in schedule)
    if released != stock:
        raise Invalid(field, f"{field}: releases sum to {released}, must equal stock {stock}")
    return tuple(schedule)


def _tier(tier: TierDefinition, field: str, starts: int | None, ends: int | None) -> Tier:
    schedule = (
        None
        if tier.schedule is None
        else _schedule(tier.schedule, f"{field}.schedule", tier.stock, starts, ends)
    )
    return Tier(tier.name.strip(), tier.stock, tier.weight, tier.value_fen, schedule)


def parse(data: Mapping[str, Any], campaign_id: str) -> Lottery:
    """Validate a lottery definition; 422 naming the first bad field (``tiers[1].stock``)."""
    definition = convert(data, LotteryDefinition)
    starts = optional_time_ms(definition.starts_at, "starts_at")
    ends = optional_time_ms(definition.ends_at, "ends_at")
    if starts is not None and ends is not None and ends <= starts:
        raise Invalid("ends_at", "ends_at must be after starts_at")
    tiers = tuple(
        _tier(tier, f"tiers[{i}]", starts, ends) for i, tier in enumerate(definition.tiers)
    )
    fallback = DEFAULT_FALLBACK if definition.fallback is None else definition.fallback.strip()
    no_prize_weight = definition.no_prize_weight or 0
    total_weight = no_prize_weight + sum(t.weight for t in tiers)
    if total_weight == 0:
        raise Invalid("tiers", "the weights of the tiers and no_prize_weight sum to 0")
    if total_weight > MAX_TOTAL_WEIGHT:
        raise Invalid("tiers", f"the weights must sum to at most {MAX_TOTAL_WEIGHT}")
    quota_total, quota_daily = definition.quota_total, definition.quota_daily
    if quota_total is None and quota_daily is None:
        raise Invalid("quota_total", "set quota_total, quota_daily or both")
    if quota_total is not None and quota_daily is not None and quota_daily > quota_total:
        raise Invalid("quota_daily", "quota_daily must not exceed quota_total")
    spec = LotterySpec(
        tiers, fallback, no_prize_weight, quota_total, quota_daily, definition.when_out
    )
    name = definition.name.strip()
    return Campaign(campaign_id, Kind.LOTTERY, name, starts, ends, spec)


Lottery = Campaign[LotterySpec]


def to_meta(campaign: Lottery) -> Meta:
    """The meta hash that opens a lottery (the draw script reads the tier count,
    weights and quotas; ``config`` is the whole definition)."""
    return encode_meta(campaign, campaign.spec.redis_meta())


def from_meta(campaign_id: str, meta: Mapping[bytes, bytes]) -> Lottery:
    """Inverse of ``to_meta``."""
    common = decode_meta_common(meta)
    try:
        spec = LotterySpec.from_json(orjson.loads(meta[b"config"]))
    except (KeyError, TypeError, orjson.JSONDecodeError) as exc:
        raise MalformedRecord(f"lottery meta of {campaign_id}: {exc!r}") from None
    return Campaign(
        campaign_id, Kind.LOTTERY, common.name, common.starts_at_ms, common.ends_at_ms, spec
    )


def from_row(row: asyncpg.Record) -> Lottery:
    """The definition as PostgreSQL's campaigns row records it (config is jsonb text)."""
    return Campaign(
        row["id"],
        Kind.LOTTERY,
        row["name"],
        optional_ms(row["starts_at"]),
        optional_ms(row["ends_at"]),
        LotterySpec.from_json(orjson.loads(row["config"])),
    )
