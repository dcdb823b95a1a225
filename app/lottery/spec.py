"""A lottery's definition: prize tiers with stock, odds and release schedules, per-player
quotas; how it is validated, stored in Redis and PostgreSQL, and read back."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import orjson

from app.errors import Invalid
from app.model import Campaign, Kind, optional_ms
from app.records import MalformedRecord, Meta, decode_meta_common, encode_meta
from app.validation import get_int, get_optional_int, get_str, get_time_ms, reject_unknown

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


def parse(data: Mapping[str, Any], campaign_id: str) -> Lottery:
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
    spec = LotterySpec(tiers, fallback, no_prize_weight, quota_total, quota_daily, when_out)
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
