"""Operator tasks over a campaign's two stores: reconcile them, rebuild Redis from PostgreSQL.

``reconcile`` proves the books balance, for red packets and lotteries alike, on a live
campaign. The stream holds exactly the entries not committed to PostgreSQL yet (drainers
commit, then XACK + XDEL), so every event settled before a moment T is, at T, either in
the stream or already in PostgreSQL. Reconcile therefore reads:

1. PostgreSQL's records of the campaign (grabs, or draws);
2. one atomic snapshot of the campaign in Redis (a MULTI: counters, winners or per-player
   draw counts, and the ledger stream);
3. again from PostgreSQL, only the events the snapshot counts that neither read found
   (a drainer committed and deleted them between 1 and 2).

Everything read in 1 was settled before the snapshot, and 3 asks only for events the
snapshot counts, so nothing settled after the snapshot is ever compared with it, and an
event found in both the stream and PostgreSQL (committed, not yet deleted) is counted
once. Entries still in the stream are reported as ledger lag, never as mismatches:
reconcile needs no quiet period. What is still missing after 3 is really missing.

``rebuild`` restores a red-packet campaign lost from Redis: meta (with the won counters),
the winners hash and the pool of envelopes no recorded grab took, from PostgreSQL.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import orjson
from redis.asyncio import Redis

from app import ledger
from app.campaigns import Campaign
from app.events import publish
from app.ledger import SettledDraw
from app.lottery import LotteryConfig
from app.scripts import CAMPAIGNS_SET, CampaignKeys, daily_key

RESTORE_CHUNK = 10_000
MAX_LISTED = 50
# A new day (Asia/Shanghai) starting during a lottery snapshot makes it read once more.
SNAPSHOT_TRIES = 5
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class OperationError(Exception):
    """The operation cannot run on this campaign; the message says why."""


@dataclass(frozen=True, slots=True)
class Totals:
    """A count of envelopes and their sum in fen."""

    count: int = 0
    fen: int = 0

    @classmethod
    def of(cls, amounts: Iterable[int]) -> Totals:
        """Totals of some amounts."""
        values = list(amounts)
        return cls(len(values), sum(values))

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.count + other.count, self.fen + other.fen)


@dataclass
class ReconcileReport:
    """What reconcile found for one campaign."""

    campaign_id: str
    kind: str
    name: str
    envelopes: Totals
    redis_winners: Totals = Totals()
    pg_grabs: Totals = Totals()
    in_flight: Totals = Totals()
    pool: Totals = Totals()
    ledger_lag: int = 0
    rejects: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing disagrees."""
        return not self.mismatches

    def render(self) -> str:
        """A readable report."""
        rows = [
            ("envelopes (PostgreSQL)", self.envelopes),
            ("Redis winners", self.redis_winners),
            ("PostgreSQL grabs", self.pg_grabs),
            ("in flight (stream only)", self.in_flight),
            ("Redis pool", self.pool),
            ("pool + winners", self.pool + self.redis_winners),
        ]
        lines = [
            f"campaign {self.campaign_id}  {self.kind}  {self.name!r}",
            f"{'':26}{'count':>10}{'fen':>16}",
            *(f"{label:26}{t.count:>10}{t.fen:>16}" for label, t in rows),
            f"ledger lag: {self.ledger_lag} stream entries not yet in PostgreSQL "
            "(in flight, not mismatches)",
            f"ledger rejects: {self.rejects}",
            *_conclusion(self.mismatches),
        ]
        return "\n".join(lines)


def _conclusion(mismatches: list[str]) -> list[str]:
    """The last lines of a report: the mismatches (the first MAX_LISTED) and the result."""
    lines = []
    if mismatches:
        lines.append(f"mismatches ({len(mismatches)}):")
        lines.extend(f"  {m}" for m in mismatches[:MAX_LISTED])
        if len(mismatches) > MAX_LISTED:
            lines.append(f"  ... and {len(mismatches) - MAX_LISTED} more")
    lines.append("result: MISMATCH" if mismatches else "result: OK")
    return lines


def _ms(ts: datetime | None) -> int | None:
    return None if ts is None else (ts - _EPOCH) // timedelta(milliseconds=1)


def campaign_from_row(row: asyncpg.Record) -> Campaign:
    """The campaign definition as PostgreSQL records it."""
    return Campaign(
        id=row["id"],
        kind=row["kind"],
        name=row["name"],
        total_fen=row["total_fen"],
        count=row["count"],
        min_fen=row["min_fen"],
        max_fen=row["max_fen"],
        starts_at_ms=_ms(row["starts_at"]),
        ends_at_ms=_ms(row["ends_at"]),
        # asyncpg hands jsonb over as text.
        config=orjson.loads(row["config"]),
    )


async def _campaign(pg: asyncpg.Pool, campaign_id: str) -> Campaign:
    row = await ledger.fetch_campaign(pg, campaign_id)
    if row is None:
        raise OperationError(f"no campaign {campaign_id!r} in PostgreSQL")
    return campaign_from_row(row)


async def _red_packet(pg: asyncpg.Pool, campaign_id: str) -> Campaign:
    campaign = await _campaign(pg, campaign_id)
    if campaign.kind != "red_packet":
        raise OperationError(f"campaign {campaign_id} is a {campaign.kind}; only red packets")
    return campaign


def _envelope(raw: bytes) -> tuple[int, int]:
    seq, amount = raw.split(b":")
    return int(seq), int(amount)


def _describe(seq_amount: tuple[int, int]) -> str:
    return f"envelope {seq_amount[0]} ({seq_amount[1]} fen)"


async def reconcile(
    redis: Redis, pg: asyncpg.Pool, campaign_id: str
) -> ReconcileReport | LotteryReport:
    """Compare a campaign (red packet or lottery) in Redis and PostgreSQL; see the docstring."""
    campaign = await _campaign(pg, campaign_id)
    if campaign.kind == "lottery":
        return await reconcile_lottery(redis, pg, campaign)
    return await _reconcile_red_packet(redis, pg, campaign)


async def _reconcile_red_packet(
    redis: Redis, pg: asyncpg.Pool, campaign: Campaign
) -> ReconcileReport:
    campaign_id = campaign.id
    envelopes = dict(await ledger.fetch_envelopes(pg, campaign_id))
    report = ReconcileReport(
        campaign_id, campaign.kind, campaign.name, Totals.of(envelopes.values())
    )
    mismatches = report.mismatches
    recorded = await ledger.fetch_grabs(pg, campaign_id)
    keys = CampaignKeys.of(campaign_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.exists(keys.meta)
        pipe.hmget(keys.meta, "won_count", "won_fen")
        pipe.hgetall(keys.winners)
        pipe.lrange(keys.pool, 0, -1)
        pipe.xrange(keys.ledger)
        exists, (won_count, won_fen), raw_winners, raw_pool, stream = await pipe.execute()

    winners = {u.decode(): _envelope(v) for u, v in raw_winners.items()}
    pool = [_envelope(v) for v in raw_pool]
    in_flight: dict[str, tuple[int, int]] = {}
    for _, fields in stream:
        if b"k" not in fields:
            in_flight[fields[b"u"].decode()] = (int(fields[b"s"]), int(fields[b"a"]))
    unseen = [u for u in winners if u not in recorded and u not in in_flight]
    if unseen:
        recorded.update(await ledger.fetch_grabs(pg, campaign_id, unseen))
    rejects = await ledger.fetch_rejects(pg, campaign_id)

    report.redis_winners = Totals.of(a for _, a in winners.values())
    report.pg_grabs = Totals.of(a for _, a in recorded.values())
    report.in_flight = Totals.of(a for u, (_, a) in in_flight.items() if u not in recorded)
    report.pool = Totals.of(a for _, a in pool)
    report.ledger_lag = len(stream)
    report.rejects = len(rejects)

    if not exists:
        # Everything below would only restate this, player by player.
        mismatches.append("campaign missing from Redis (lost?): run `rebuild`")
        return report
    if (int(won_count or 0), int(won_fen or 0)) != (
        report.redis_winners.count,
        report.redis_winners.fen,
    ):
        mismatches.append(
            f"Redis meta says {int(won_count or 0)} won / {int(won_fen or 0)} fen, "
            f"winners hash has {report.redis_winners.count} / {report.redis_winners.fen} fen"
        )
    for user, grant in sorted(winners.items()):
        if user in recorded:
            if recorded[user] != grant:
                mismatches.append(
                    f"player {user}: Redis {_describe(grant)}, "
                    f"PostgreSQL {_describe(recorded[user])}"
                )
        elif user in in_flight:
            if in_flight[user] != grant:
                mismatches.append(
                    f"player {user}: Redis {_describe(grant)}, "
                    f"ledger stream {_describe(in_flight[user])}"
                )
        else:
            mismatches.append(
                f"player {user}: won {_describe(grant)} in Redis, not in PostgreSQL nor in flight"
            )
    for user, grant in sorted(recorded.items()):
        if user not in winners:
            mismatches.append(
                f"player {user}: recorded in PostgreSQL ({_describe(grant)}), not a Redis winner"
            )
    for user in sorted(set(in_flight) - set(winners)):
        mismatches.append(f"player {user}: in the ledger stream, not a Redis winner")
    mismatches.extend(_envelope_mismatches(envelopes, winners, recorded, pool))
    mismatches.extend(
        f"ledger reject {r['stream_id']} ({r['kind']}): {r['reason']} {r['fields']}"
        for r in rejects
    )
    return report


def _envelope_mismatches(
    envelopes: dict[int, int],
    winners: dict[str, tuple[int, int]],
    recorded: dict[str, tuple[int, int]],
    pool: list[tuple[int, int]],
) -> list[str]:
    """Pool + winners must be the envelopes, each exactly once, with their amounts."""
    out: list[str] = []
    seen: dict[int, str] = {}
    holders: list[tuple[str, tuple[int, int]]] = [
        *((f"player {u} (Redis)", g) for u, g in sorted(winners.items())),
        *((f"the pool (position {i})", g) for i, g in enumerate(pool)),
    ]
    for holder, (seq, amount) in holders:
        if seq not in envelopes:
            out.append(f"{holder} holds envelope {seq}, which does not exist")
            continue
        if envelopes[seq] != amount:
            out.append(f"{holder} holds envelope {seq} as {amount} fen; it is {envelopes[seq]}")
        if seq in seen:
            out.append(f"envelope {seq} is held twice: by {seen[seq]} and by {holder}")
        seen[seq] = holder
    lost = sorted(set(envelopes) - set(seen))
    if lost:
        shown = ", ".join(map(str, lost[:10])) + (" ..." if len(lost) > 10 else "")
        out.append(f"{len(lost)} envelope(s) neither in the pool nor won: {shown}")
    for user, (seq, amount) in sorted(recorded.items()):
        if envelopes.get(seq) != amount:
            out.append(
                f"player {user}: PostgreSQL grab of envelope {seq} is {amount} fen; "
                f"the envelope is {envelopes.get(seq)}"
            )
    return out


# --- Lotteries -------------------------------------------------------------------------

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
    ledger_lag: int = 0
    rejects: int = 0
    mismatches: list[str] = field(default_factory=list)

    kind = "lottery"

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
                f"  {t.tier:<3} {_fit(t.name, 20)}{t.stock:>10}{t.won_redis:>10}{t.recorded:>16}"
                for t in self.tiers
            ),
            "  (won: Redis counter; recorded: PostgreSQL + in flight)",
            f"ledger lag: {self.ledger_lag} stream entries not yet in PostgreSQL "
            "(in flight, not mismatches)",
            f"ledger rejects: {self.rejects}",
            *_conclusion(self.mismatches),
        ]
        return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    """``text`` cut and padded to ``width`` terminal columns (CJK characters take two)."""

    def cols(part: str) -> int:
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in part)

    while cols(text) > width:
        text = text[:-2] + "…"
    return text + " " * (width - cols(text))


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
            for day in ordered:
                pipe.hgetall(daily_key(campaign_id, day))
            exists, tiers, draws, days_raw, wins_raw, stream, *daily = await pipe.execute()
        per_day = _int_keys(days_raw, b"")
        if per_day.keys() <= known:
            wins: dict[str, set[tuple[int, int]]] = {}
            for user, value in wins_raw.items():
                wins[user.decode()] = {
                    (int(n), int(t)) for n, t in (e.split(b":") for e in value.split(b",") if e)
                }
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
            )
        known |= per_day.keys()
    raise OperationError(f"the days of lottery {campaign_id} kept changing during the snapshot")


def _stream_draws(
    stream: list[tuple[bytes, dict[bytes, bytes]]], mismatches: list[str]
) -> dict[Key, SettledDraw]:
    """The draws in the ledger stream; entries that are not draws are mismatches."""
    out: dict[Key, SettledDraw] = {}
    for raw_id, fields in stream:
        sid = raw_id.decode()
        try:
            if fields.get(b"k") != b"draw":
                raise ValueError("not a draw entry")
            tier = int(fields[b"p"])
            key = (fields[b"u"].decode(), int(fields[b"n"]))
            draw = SettledDraw(
                None if tier < 0 else tier, int(fields[b"a"]), int(fields[b"d"]), sid
            )
        except (KeyError, ValueError) as exc:
            mismatches.append(f"ledger stream entry {sid} is not a valid draw ({exc}): {fields}")
            continue
        if key in out:
            mismatches.append(f"player {key[0]}: draw {key[1]} is twice in the ledger stream")
        out[key] = draw
    return out


def _numbers(values: Iterable[int]) -> str:
    shown = sorted(values)
    return ", ".join(map(str, shown[:10])) + (" ..." if len(shown) > 10 else "")


def _totals(draws: Iterable[SettledDraw]) -> tuple[int, int, int]:
    listed = list(draws)
    prizes = [d for d in listed if d.tier is not None]
    return len(listed), len(prizes), sum(d.value_fen for d in prizes)


async def reconcile_lottery(redis: Redis, pg: asyncpg.Pool, campaign: Campaign) -> LotteryReport:
    """Compare a lottery's Redis counters with its draws in PostgreSQL and the stream.

    Checks, against the ledger (draws in PostgreSQL plus those in flight, each counted
    once by (player, draw number)): each player's draws numbered 1..n with n Redis's
    count; draws per player per day and per day; prizes per tier (and never above
    stock) and per day; each player's prizes; each prize's value. See the module
    docstring for why a live lottery gives no false mismatch.
    """
    config = LotteryConfig.from_json(campaign.config)
    cid = campaign.id
    report = LotteryReport(cid, campaign.name)
    mismatches = report.mismatches
    recorded = await ledger.fetch_draws(pg, cid)
    snap = await _lottery_snapshot(redis, cid, {d.day for d in recorded.values()})
    in_stream = _stream_draws(snap.stream, mismatches)
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
    mismatches.extend(
        f"ledger reject {r['stream_id']} ({r['kind']}): {r['reason']} {r['fields']}"
        for r in rejects
    )
    return report


def _draw_mismatches(
    config: LotteryConfig, snap: LotterySnapshot, book: dict[Key, SettledDraw]
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
                f"player {user}: draw(s) {_numbers(missing)} of {count} settled in Redis, "
                "not in PostgreSQL nor in flight"
            )
        extra = have - set(range(1, count + 1))
        if extra:
            out.append(
                f"player {user}: draw(s) {_numbers(extra)} in the ledger, "
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


def _pairs(pairs: set[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{n}:{t}" for n, t in sorted(pairs)) + "]"


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """What rebuild restored."""

    campaign_id: str
    winners: Totals
    pool: Totals
    rejects: int

    def render(self) -> str:
        """A readable summary."""
        lines = [
            f"rebuilt campaign {self.campaign_id} from PostgreSQL:",
            f"  winners  {self.winners.count:>10} {self.winners.fen:>14} fen",
            f"  pool     {self.pool.count:>10} {self.pool.fen:>14} fen",
            f"  total    {self.winners.count + self.pool.count:>10} "
            f"{self.winners.fen + self.pool.fen:>14} fen",
        ]
        if self.rejects:
            lines.append(f"  warning: {self.rejects} ledger reject(s) not restored; see reconcile")
        return "\n".join(lines)


async def rebuild(redis: Redis, pg: asyncpg.Pool, campaign_id: str) -> RebuildResult:
    """Restore a red-packet campaign lost from Redis, from PostgreSQL."""
    campaign = await _red_packet(pg, campaign_id)
    keys = CampaignKeys.of(campaign_id)
    if await redis.exists(keys.meta):
        raise OperationError(
            f"campaign {campaign_id} is live in Redis (its meta exists); rebuild only "
            "restores a campaign lost from Redis"
        )
    # Without meta no grab can settle, so the stream cannot grow while we work.
    lag = int(await redis.xlen(keys.ledger))
    if lag:
        raise OperationError(
            f"{lag} ledger entries of campaign {campaign_id} are still in Redis, not yet "
            "in PostgreSQL; let the drainers record them first"
        )
    grabs = await ledger.fetch_grabs(pg, campaign_id)
    pool = await ledger.fetch_ungranted(pg, campaign_id)
    rejects = len(await ledger.fetch_rejects(pg, campaign_id))
    won = Totals.of(a for _, a in grabs.values())
    left = Totals.of(a for _, a in pool)
    if (won + left) != Totals(campaign.count or 0, campaign.total_fen or 0):
        raise OperationError(
            f"PostgreSQL is inconsistent: grabs {won} + ungranted {left} != "
            f"{campaign.count} envelopes / {campaign.total_fen} fen"
        )
    await redis.delete(keys.pool, keys.winners)
    items = list(grabs.items())
    for start in range(0, len(items), RESTORE_CHUNK):
        chunk = items[start : start + RESTORE_CHUNK]
        await redis.hset(keys.winners, mapping={u: f"{s}:{a}" for u, (s, a) in chunk})
    # Envelopes go back in seq order, which is the shuffled order of creation.
    for start in range(0, len(pool), RESTORE_CHUNK):
        await redis.rpush(keys.pool, *[f"{s}:{a}" for s, a in pool[start : start + RESTORE_CHUNK]])
    meta: dict[Any, Any] = {**campaign.to_meta(), "won_count": won.count, "won_fen": won.fen}
    # Meta last: its presence opens the campaign to grabs again.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.meta, mapping=meta)
        pipe.sadd(CAMPAIGNS_SET, campaign_id)
        await pipe.execute()
    # Workers that knew the campaign sold out must ask its script again.
    await publish(redis, "reset", campaign_id)
    return RebuildResult(campaign_id, won, left, rejects)
