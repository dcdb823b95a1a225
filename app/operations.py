"""Operator tasks over a campaign's two stores: reconcile them, rebuild Redis from PostgreSQL.

``reconcile`` proves the books balance. It reads PostgreSQL's grabs first, then one
atomic snapshot of the campaign in Redis (meta, winners, pool and the ledger stream
in a MULTI), then re-reads from PostgreSQL only the winners it did not find the first
time (a drainer may have committed them in between; the stream holds exactly what is
not committed yet, so anything missing from both the stream and PostgreSQL after the
snapshot is really missing). Entries still in the stream are reported as ledger lag,
never as mismatches, so reconcile needs no quiet period.

``rebuild`` restores a campaign lost from Redis: meta (with the won counters), the
winners hash and the pool of envelopes no recorded grab took, from PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from app import ledger
from app.campaigns import Campaign
from app.scripts import CAMPAIGNS_SET, CampaignKeys

RESTORE_CHUNK = 10_000
MAX_LISTED = 50
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
        ]
        if self.mismatches:
            lines.append(f"mismatches ({len(self.mismatches)}):")
            lines.extend(f"  {m}" for m in self.mismatches[:MAX_LISTED])
            if len(self.mismatches) > MAX_LISTED:
                lines.append(f"  ... and {len(self.mismatches) - MAX_LISTED} more")
        lines.append("result: OK" if self.ok else "result: MISMATCH")
        return "\n".join(lines)


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


async def _red_packet(pg: asyncpg.Pool, campaign_id: str) -> Campaign:
    row = await ledger.fetch_campaign(pg, campaign_id)
    if row is None:
        raise OperationError(f"no campaign {campaign_id!r} in PostgreSQL")
    campaign = campaign_from_row(row)
    if campaign.kind != "red_packet":
        raise OperationError(f"campaign {campaign_id} is a {campaign.kind}; only red packets")
    return campaign


def _envelope(raw: bytes) -> tuple[int, int]:
    seq, amount = raw.split(b":")
    return int(seq), int(amount)


def _describe(seq_amount: tuple[int, int]) -> str:
    return f"envelope {seq_amount[0]} ({seq_amount[1]} fen)"


async def reconcile(redis: Redis, pg: asyncpg.Pool, campaign_id: str) -> ReconcileReport:
    """Compare a red-packet campaign in Redis and PostgreSQL; see the module docstring."""
    campaign = await _red_packet(pg, campaign_id)
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
    return RebuildResult(campaign_id, won, left, rejects)
