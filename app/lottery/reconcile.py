"""Reconcile a lottery: Redis's counters against its draws in PostgreSQL and the stream.

See app.campaigns.operations for why a live lottery gives no false mismatch. Once the
lottery is closed out, each tier's leftovers must account for its stock: unreleased +
unwon + won == stock, unreleased being the stock of the slots at or after the end, and
the ledger's close-out (recorded or in flight) must say the same as Redis's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import asyncpg
from redis.asyncio import Redis

from app.errors import OperationError
from app.lottery.spec import Lottery, LotterySpec
from app.model import Kind
from app.records import (
    CloseoutRecord,
    DrawRecord,
    LedgerEntry,
    MalformedRecord,
    PauseRecord,
    TierLeftover,
    decode_leftovers,
    decode_wins,
)
from app.reports import closeout_count, conclusion, fit, listed
from app.store import ledger
from app.store.ledger import SettledDraw
from app.store.scripts import CampaignKeys, daily_key

# A new day (Asia/Shanghai) starting during a lottery snapshot makes it read once more.
SNAPSHOT_TRIES = 5


Key = tuple[str, int]  # (openid, draw number)


@dataclass(frozen=True, slots=True)
class TierLine:
    """One tier's line in a lottery report."""

    tier: int
    name: str
    stock: int
    won_redis: int
    recorded: int


@dataclass
class LotteryReport:
    """What reconcile found for one lottery."""

    campaign_id: str
    name: str
    # (draws, prizes, prize fen) of each source
    redis: tuple[int, int, int] = (0, 0, 0)
    pg: tuple[int, int, int] = (0, 0, 0)
    in_flight: tuple[int, int, int] = (0, 0, 0)
    tiers: list[TierLine] = field(default_factory=list)
    players: int = 0
    # Per tier (unreleased, unwon) of the close-out, once closed out (Redis's meta).
    closeout: tuple[TierLeftover, ...] | None = None
    ledger_lag: int = 0
    rejects: int = 0
    mismatches: list[str] = field(default_factory=list)

    kind = Kind.LOTTERY

    @property
    def ok(self) -> bool:
        """True when nothing disagrees."""
        return not self.mismatches

    def render(self) -> str:
        """A readable report."""
        rows = [
            ("Redis (settled)", self.redis),
            ("PostgreSQL draws", self.pg),
            ("in flight (stream only)", self.in_flight),
        ]
        lines = [
            f"campaign {self.campaign_id}  lottery  {self.name!r}",
            f"{'':26}{'draws':>10}{'prizes':>10}{'prize fen':>16}",
            *(f"{label:26}{d:>10}{p:>10}{f:>16}" for label, (d, p, f) in rows),
            f"players (Redis)           {self.players:>10}",
            f"{'tier':26}{'stock':>10}{'won':>10}{'recorded':>16}",
            *(
                f"  {t.tier:<3} {fit(t.name, 20)}{t.stock:>10}{t.won_redis:>10}{t.recorded:>16}"
                for t in self.tiers
            ),
            "  (won: Redis counter; recorded: PostgreSQL + in flight)",
            *(
                [
                    "close-out (Redis): unreleased:unwon per tier "
                    + ", ".join(f"{t.unreleased}:{t.unwon}" for t in self.closeout)
                ]
                if self.closeout is not None
                else []
            ),
            f"ledger lag: {self.ledger_lag} stream entries not yet in PostgreSQL "
            "(in flight, not mismatches)",
            f"ledger rejects: {self.rejects}",
            *conclusion(self.mismatches),
        ]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class LotterySnapshot:
    """A lottery's Redis state, read in one MULTI."""

    exists: bool
    won: dict[int, int]  # tier -> won counter
    draws: dict[str, int]  # openid -> draws so far
    days: dict[int, int]  # day -> draws that day
    prizes_per_day: dict[int, int]  # day -> prizes that day
    daily: dict[tuple[int, str], int]  # (day, openid) -> draws that day
    wins: dict[str, set[tuple[int, int]]]  # openid -> {(draw_no, tier)}
    stream: list[tuple[bytes, dict[bytes, bytes]]]
    closeout: tuple[TierLeftover, ...] | None  # once closed out
    ends_at_ms: int | None  # when it ends (or ended: an operator's end moves it)


def _int_keys(raw: dict[bytes, bytes], prefix: bytes) -> dict[int, int]:
    """Fields ``<prefix><int>`` of a hash as int -> int."""
    return {
        int(k[len(prefix) :]): int(v)
        for k, v in raw.items()
        if k.startswith(prefix) and k[len(prefix) :].isdigit()
    }


async def _lottery_snapshot(redis: Redis, campaign_id: str, days: set[int]) -> LotterySnapshot:
    """One MULTI over every key of the lottery, the per-day hashes included.

    Which per-day hashes exist is known only from the days hash, so the MULTI reads the
    days already known (from PostgreSQL and a first look) and checks its own copy of the
    days hash: a day that began in between makes it read once more.
    """
    keys = CampaignKeys.of(campaign_id)
    first_look = cast(dict[bytes, bytes], await redis.hgetall(keys.days))
    known = set(days) | _int_keys(first_look, b"").keys()
    for _ in range(SNAPSHOT_TRIES):
        ordered = sorted(known)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.exists(keys.meta)
            pipe.hgetall(keys.tiers)
            pipe.hgetall(keys.draws)
            pipe.hgetall(keys.days)
            pipe.hgetall(keys.wins)
            pipe.xrange(keys.ledger)
            pipe.hmget(keys.meta, "closeout", "ends_at_ms")
            for day in ordered:
                pipe.hgetall(daily_key(campaign_id, day))
            replies = await pipe.execute()
        exists, tiers, draws, days_raw, wins_raw, stream, (closing, ends), *daily = replies
        per_day = _int_keys(days_raw, b"")
        if per_day.keys() <= known:
            wins = {user.decode(): set(decode_wins(value)) for user, value in wins_raw.items()}
            return LotterySnapshot(
                exists=bool(exists),
                won=_int_keys(tiers, b"won:"),
                draws={u.decode(): int(n) for u, n in draws.items()},
                days=per_day,
                prizes_per_day=_int_keys(days_raw, b"won:"),
                daily={
                    (day, u.decode()): int(n)
                    for day, raw in zip(ordered, daily, strict=True)
                    for u, n in raw.items()
                },
                wins=wins,
                stream=stream,
                closeout=None if closing is None else decode_leftovers(closing),
                ends_at_ms=None if ends is None else int(ends),
            )
        known |= per_day.keys()
    raise OperationError(f"the days of lottery {campaign_id} kept changing during the snapshot")


def _stream_draws(
    campaign_id: str,
    stream: list[tuple[bytes, dict[bytes, bytes]]],
    mismatches: list[str],
    closeouts: list[CloseoutRecord],
) -> dict[Key, SettledDraw]:
    """The draws in the ledger stream (its close-out into ``closeouts``, pauses skipped);
    other entries are mismatches."""
    out: dict[Key, SettledDraw] = {}
    for raw_id, fields in stream:
        try:
            record = LedgerEntry.of(campaign_id, raw_id, fields).decode()
        except MalformedRecord as exc:
            mismatches.append(f"ledger stream entry {raw_id.decode()} is not a valid draw ({exc})")
            continue
        if isinstance(record, PauseRecord):
            continue
        if isinstance(record, CloseoutRecord) and record.tiers is not None:
            closeouts.append(record)
            continue
        if not isinstance(record, DrawRecord):
            mismatches.append(f"ledger stream entry {record.stream_id} is not a draw")
            continue
        key = (record.openid, record.draw_no)
        if key in out:
            mismatches.append(f"player {key[0]}: draw {key[1]} is twice in the ledger stream")
        out[key] = SettledDraw(record.tier, record.value_fen, record.day, record.stream_id)
    return out


def _totals(draws: Iterable[SettledDraw]) -> tuple[int, int, int]:
    listed = list(draws)
    prizes = [d for d in listed if d.tier is not None]
    return len(listed), len(prizes), sum(d.value_fen for d in prizes)


async def reconcile(redis: Redis, pg: asyncpg.Pool, campaign: Lottery) -> LotteryReport:
    """Compare a lottery's Redis counters with its draws in PostgreSQL and the stream.

    Checks, against the ledger (draws in PostgreSQL plus those in flight, each counted
    once by (player, draw number)): each player's draws numbered 1..n with n Redis's
    count; draws per player per day and per day; prizes per tier (and never above
    stock) and per day; each player's prizes; each prize's value. See the module
    docstring for why a live lottery gives no false mismatch.
    """
    config = campaign.spec
    cid = campaign.id
    report = LotteryReport(cid, campaign.name)
    mismatches = report.mismatches
    recorded = await ledger.fetch_draws(pg, cid)
    closeout = await ledger.fetch_closeout(pg, cid)
    snap = await _lottery_snapshot(redis, cid, {d.day for d in recorded.values()})
    closeouts: list[CloseoutRecord] = []
    in_stream = _stream_draws(cid, snap.stream, mismatches, closeouts)
    if snap.closeout is not None and closeout is None and not closeouts:
        # Recorded (and deleted from the stream) between the first read and the snapshot.
        closeout = await ledger.fetch_closeout(pg, cid)
    ledger_closeouts = [c.tiers for c in closeouts if c.tiers is not None]
    if closeout is not None and closeout.tiers is not None:
        ledger_closeouts.append(closeout.tiers)
    counted = {(u, n) for u, count in snap.draws.items() for n in range(1, count + 1)}
    unseen = sorted(k for k in counted if k not in recorded and k not in in_stream)
    if unseen:
        recorded.update(await ledger.fetch_draws(pg, cid, unseen))
    rejects = await ledger.fetch_rejects(pg, cid)

    for key in sorted(recorded.keys() & in_stream.keys()):
        pg_draw, streamed = recorded[key], in_stream[key]
        if pg_draw != streamed:
            mismatches.append(
                f"player {key[0]}: draw {key[1]} is {pg_draw} in PostgreSQL, "
                f"{streamed} in the ledger stream"
            )
    book = {**in_stream, **recorded}
    flying = {k: d for k, d in in_stream.items() if k not in recorded}
    won_fen = sum(snap.won.get(i, 0) * (t.value_fen or 0) for i, t in enumerate(config.tiers))
    report.redis = (sum(snap.draws.values()), sum(snap.won.values()), won_fen)
    report.pg = _totals(recorded.values())
    report.in_flight = _totals(flying.values())
    report.players = len(snap.draws)
    report.ledger_lag = len(snap.stream)
    report.rejects = len(rejects)
    by_tier = Counter(d.tier for d in book.values() if d.tier is not None)
    report.tiers = [
        TierLine(i, t.name, t.stock, snap.won.get(i, 0), by_tier.get(i, 0))
        for i, t in enumerate(config.tiers)
    ]

    if not snap.exists:
        # Everything below would only restate this, player by player.
        mismatches.append("campaign missing from Redis (lost?); rebuild restores red packets only")
        return report
    mismatches.extend(_draw_mismatches(config, snap, book))
    report.closeout = snap.closeout
    mismatches.extend(_closeout_mismatches(config, snap, ledger_closeouts))
    mismatches.extend(
        f"ledger reject {r['stream_id']} ({r['kind']}): {r['reason']} {r['fields']}"
        for r in rejects
    )
    return report


def _draw_mismatches(
    config: LotterySpec, snap: LotterySnapshot, book: dict[Key, SettledDraw]
) -> list[str]:
    """Redis's counters against the ledger's draws, each rule in turn."""
    out: list[str] = []
    numbers: dict[str, set[int]] = {}
    for user, n in book:
        numbers.setdefault(user, set()).add(n)
    for user in sorted(snap.draws.keys() | numbers.keys()):
        count, have = snap.draws.get(user, 0), numbers.get(user, set())
        missing = set(range(1, count + 1)) - have
        if missing:
            out.append(
                f"player {user}: draw(s) {listed(missing)} of {count} settled in Redis, "
                "not in PostgreSQL nor in flight"
            )
        extra = have - set(range(1, count + 1))
        if extra:
            out.append(
                f"player {user}: draw(s) {listed(extra)} in the ledger, "
                f"but Redis counts {count} draw(s)"
            )
    tiers = len(config.tiers)
    by_tier = Counter(d.tier for d in book.values() if d.tier is not None)
    for tier in sorted(snap.won.keys() | by_tier.keys()):
        won, recorded = snap.won.get(tier, 0), by_tier.get(tier, 0)
        if won != recorded:
            out.append(f"tier {tier}: {won} won in Redis, {recorded} in the ledger")
        if tier < tiers and max(won, recorded) > config.tiers[tier].stock:
            out.append(
                f"tier {tier}: {max(won, recorded)} won, stock is {config.tiers[tier].stock}"
            )
    for (user, n), draw in sorted(book.items()):
        if draw.tier is None:
            expected = 0
        elif draw.tier >= tiers:
            out.append(f"player {user}: draw {n} won tier {draw.tier}, which does not exist")
            continue
        else:
            expected = config.tiers[draw.tier].value_fen or 0
        if draw.value_fen != expected:
            out.append(
                f"player {user}: draw {n} is recorded as {draw.value_fen} fen, "
                f"its prize is worth {expected}"
            )
    daily = Counter((d.day, user) for (user, _), d in book.items())
    for day, user in sorted(snap.daily.keys() | daily.keys()):
        in_redis, in_ledger = snap.daily.get((day, user), 0), daily.get((day, user), 0)
        if in_redis != in_ledger:
            out.append(
                f"player {user} on {day}: {in_redis} draws in Redis, {in_ledger} in the ledger"
            )
    per_day = Counter(d.day for d in book.values())
    prizes_per_day = Counter(d.day for d in book.values() if d.tier is not None)
    for day in sorted(snap.days.keys() | per_day.keys()):
        if snap.days.get(day, 0) != per_day.get(day, 0):
            out.append(
                f"day {day}: {snap.days.get(day, 0)} draws in Redis, "
                f"{per_day.get(day, 0)} in the ledger"
            )
    for day in sorted(snap.prizes_per_day.keys() | prizes_per_day.keys()):
        if snap.prizes_per_day.get(day, 0) != prizes_per_day.get(day, 0):
            out.append(
                f"day {day}: {snap.prizes_per_day.get(day, 0)} prizes in Redis, "
                f"{prizes_per_day.get(day, 0)} in the ledger"
            )
    prizes: dict[str, set[tuple[int, int]]] = {}
    for (user, n), draw in book.items():
        if draw.tier is not None:
            prizes.setdefault(user, set()).add((n, draw.tier))
    for user in sorted(snap.wins.keys() | prizes.keys()):
        told, kept = snap.wins.get(user, set()), prizes.get(user, set())
        if told != kept:
            out.append(
                f"player {user}: prizes (draw:tier) {_pairs(told)} in Redis, "
                f"{_pairs(kept)} in the ledger"
            )
    return out


def _closeout_mismatches(
    config: LotterySpec, snap: LotterySnapshot, ledger_closeouts: list[tuple[TierLeftover, ...]]
) -> list[str]:
    """Once closed out, per tier: unreleased + unwon + won == stock, unreleased the slots
    at or after the end; the ledger's close-out is Redis's."""
    if snap.closeout is None:
        if ledger_closeouts:
            return ["the ledger holds a close-out, Redis none"]
        return []
    out: list[str] = []
    if len(snap.closeout) != len(config.tiers):
        out.append(
            f"close-out lists {len(snap.closeout)} tiers, the lottery has {len(config.tiers)}"
        )
    ends = snap.ends_at_ms
    for i, (tier, left) in enumerate(zip(config.tiers, snap.closeout, strict=False)):
        won = snap.won.get(i, 0)
        if left.unreleased + left.unwon + won != tier.stock:
            out.append(
                f"tier {i}: unreleased {left.unreleased} + unwon {left.unwon} + won {won} "
                f"!= stock {tier.stock}"
            )
        if ends is not None:
            never = sum(s.release for s in tier.schedule or () if s.at_ms >= ends)
            if left.unreleased != never:
                out.append(
                    f"tier {i}: {left.unreleased} unreleased at the close-out, "
                    f"its slots at or after the end hold {never}"
                )
    out += closeout_count(len(ledger_closeouts))
    for kept in ledger_closeouts:
        if kept != snap.closeout:
            out.append("the ledger's close-out differs from Redis's")
    return out


def _pairs(pairs: set[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{n}:{t}" for n, t in sorted(pairs)) + "]"
