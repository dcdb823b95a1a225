"""Reconcile a red packet: Redis's pool and winners against PostgreSQL's envelopes and grabs.

See app.campaigns.operations for why a live campaign gives no false mismatch: PostgreSQL
is read first, then one MULTI snapshot of Redis, then PostgreSQL again for exactly the
winners the snapshot counts that neither read found.

Once the campaign is closed out (meta ``closed_ms``), its refund must make up the
budget: won + refunded == total, in count and fen, both in Redis and in the ledger
(grants and the close-out, recorded or in flight); the refund is exactly the pool left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from app.model import Kind
from app.records import (
    CloseoutRecord,
    Envelope,
    GrabRecord,
    LedgerEntry,
    MalformedRecord,
    PauseRecord,
)
from app.redpacket.spec import RedPacket
from app.reports import Totals, closeout_count, conclusion
from app.store import ledger
from app.store.scripts import CampaignKeys


@dataclass
class ReconcileReport:
    """What reconcile found for one red packet."""

    campaign_id: str
    name: str
    envelopes: Totals
    redis_winners: Totals = Totals()
    pg_grabs: Totals = Totals()
    in_flight: Totals = Totals()
    pool: Totals = Totals()
    # The close-out's refund: in Redis's meta, and in the ledger (recorded or in flight).
    refunded: Totals | None = None
    ledger_refund: Totals | None = None
    ledger_lag: int = 0
    rejects: int = 0
    mismatches: list[str] = field(default_factory=list)

    kind = Kind.RED_PACKET

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
        if self.refunded is not None:
            rows.append(("Redis refunded (close-out)", self.refunded))
            rows.append(("winners + refunded", self.redis_winners + self.refunded))
        if self.ledger_refund is not None:
            rows.append(("ledger refunded", self.ledger_refund))
        lines = [
            f"campaign {self.campaign_id}  {self.kind}  {self.name!r}",
            f"{'':26}{'count':>10}{'fen':>16}",
            *(f"{label:26}{t.count:>10}{t.fen:>16}" for label, t in rows),
            f"ledger lag: {self.ledger_lag} stream entries not yet in PostgreSQL "
            "(in flight, not mismatches)",
            f"ledger rejects: {self.rejects}",
            *conclusion(self.mismatches),
        ]
        return "\n".join(lines)


def _in_flight(
    campaign_id: str,
    stream: list[tuple[bytes, dict[bytes, bytes]]],
    mismatches: list[str],
    closeouts: list[CloseoutRecord],
) -> dict[str, Envelope]:
    """The grants in the ledger stream (its close-out into ``closeouts``, pauses
    skipped); any other entry is a mismatch."""
    out: dict[str, Envelope] = {}
    for raw_id, fields in stream:
        try:
            record = LedgerEntry.of(campaign_id, raw_id, fields).decode()
        except MalformedRecord as exc:
            mismatches.append(f"ledger stream entry {raw_id.decode()}: {exc}")
            continue
        if isinstance(record, GrabRecord):
            out[record.openid] = record.envelope
        elif isinstance(record, CloseoutRecord) and record.tiers is None:
            closeouts.append(record)
        elif not isinstance(record, PauseRecord):
            mismatches.append(f"ledger stream entry {record.stream_id} is not a grant")
    return out


async def reconcile(redis: Redis, pg: asyncpg.Pool, campaign: RedPacket) -> ReconcileReport:
    """Compare a red packet in Redis and PostgreSQL."""
    campaign_id = campaign.id
    envelopes = {e.seq: e.amount_fen for e in await ledger.fetch_envelopes(pg, campaign_id)}
    report = ReconcileReport(campaign_id, campaign.name, Totals.of(envelopes.values()))
    mismatches = report.mismatches
    recorded = await ledger.fetch_grabs(pg, campaign_id)
    closeout = await ledger.fetch_closeout(pg, campaign_id)
    keys = CampaignKeys.of(campaign_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.exists(keys.meta)
        pipe.hmget(keys.meta, "won_count", "won_fen")
        pipe.hmget(keys.meta, "closed_ms", "refunded_count", "refunded_fen")
        pipe.hgetall(keys.winners)
        pipe.lrange(keys.pool, 0, -1)
        pipe.xrange(keys.ledger)
        exists, (won_count, won_fen), closed, raw_winners, raw_pool, stream = await pipe.execute()

    winners = {u.decode(): Envelope.decode(v) for u, v in raw_winners.items()}
    pool = [Envelope.decode(v) for v in raw_pool]
    closeouts: list[CloseoutRecord] = []
    in_flight = _in_flight(campaign_id, stream, mismatches, closeouts)
    unseen = [u for u in winners if u not in recorded and u not in in_flight]
    if unseen:
        recorded.update(await ledger.fetch_grabs(pg, campaign_id, unseen))
    if closed[0] is not None and closeout is None and not closeouts:
        # Recorded (and deleted from the stream) between the first read and the snapshot.
        closeout = await ledger.fetch_closeout(pg, campaign_id)
    rejects = await ledger.fetch_rejects(pg, campaign_id)

    report.redis_winners = Totals.of(e.amount_fen for e in winners.values())
    report.pg_grabs = Totals.of(e.amount_fen for e in recorded.values())
    report.in_flight = Totals.of(e.amount_fen for u, e in in_flight.items() if u not in recorded)
    report.pool = Totals.of(e.amount_fen for e in pool)
    report.ledger_lag = len(stream)
    report.rejects = len(rejects)

    if not exists:
        # Everything below would only restate this, player by player.
        mismatches.append("campaign missing from Redis (lost?): run `rebuild`")
        return report
    counted = Totals(int(won_count or 0), int(won_fen or 0))
    if counted != report.redis_winners:
        mismatches.append(
            f"Redis meta says {counted.count} won / {counted.fen} fen, "
            f"winners hash has {report.redis_winners.count} / {report.redis_winners.fen} fen"
        )
    for user, grant in sorted(winners.items()):
        if user in recorded:
            if recorded[user] != grant:
                mismatches.append(f"player {user}: Redis {grant}, PostgreSQL {recorded[user]}")
        elif user in in_flight:
            if in_flight[user] != grant:
                mismatches.append(f"player {user}: Redis {grant}, ledger stream {in_flight[user]}")
        else:
            mismatches.append(
                f"player {user}: won {grant} in Redis, not in PostgreSQL nor in flight"
            )
    for user, grant in sorted(recorded.items()):
        if user not in winners:
            mismatches.append(
                f"player {user}: recorded in PostgreSQL ({grant}), not a Redis winner"
            )
    for user in sorted(set(in_flight) - set(winners)):
        mismatches.append(f"player {user}: in the ledger stream, not a Redis winner")
    mismatches.extend(_envelope_mismatches(envelopes, winners, recorded, pool))
    if closed[0] is not None:
        report.refunded = Totals(int(closed[1] or 0), int(closed[2] or 0))
    ledger_refunds = [Totals(c.refunded_count, c.refunded_fen) for c in closeouts]
    if closeout is not None:
        ledger_refunds.append(Totals(closeout.refunded_count, closeout.refunded_fen))
    if ledger_refunds:
        report.ledger_refund = ledger_refunds[0]
    mismatches.extend(
        _closeout_mismatches(
            Totals(campaign.spec.count, campaign.spec.total_fen),
            report.redis_winners,
            report.pg_grabs + report.in_flight,
            report.pool,
            report.refunded,
            ledger_refunds,
        )
    )
    mismatches.extend(
        f"ledger reject {r['stream_id']} ({r['kind']}): {r['reason']} {r['fields']}"
        for r in rejects
    )
    return report


def _closeout_mismatches(
    budget: Totals,
    winners: Totals,
    ledger_grants: Totals,
    pool: Totals,
    refunded: Totals | None,
    ledger_refunds: list[Totals],
) -> list[str]:
    """Once closed out, the refund makes up the budget, in Redis and in the ledger."""
    if refunded is None:
        if ledger_refunds:
            return [f"the ledger holds a close-out ({ledger_refunds[0]}), Redis none"]
        return []
    out: list[str] = []
    if winners + refunded != budget:
        out.append(
            f"won {winners.count} / {winners.fen} fen + refunded {refunded.count} / "
            f"{refunded.fen} fen != {budget.count} envelopes / {budget.fen} fen"
        )
    if refunded != pool:
        out.append(
            f"refunded {refunded.count} / {refunded.fen} fen, the pool holds "
            f"{pool.count} / {pool.fen} fen"
        )
    out += closeout_count(len(ledger_refunds))
    for ledger_refund in ledger_refunds:
        if ledger_refund != refunded:
            out.append(
                f"the ledger's close-out refunds {ledger_refund.count} / {ledger_refund.fen} "
                f"fen, Redis's {refunded.count} / {refunded.fen} fen"
            )
        elif ledger_grants + ledger_refund != budget:
            out.append(
                f"ledger: granted {ledger_grants.count} / {ledger_grants.fen} fen + refunded "
                f"{ledger_refund.count} / {ledger_refund.fen} fen != {budget.count} / "
                f"{budget.fen} fen"
            )
    return out


def _envelope_mismatches(
    envelopes: dict[int, int],
    winners: dict[str, Envelope],
    recorded: dict[str, Envelope],
    pool: list[Envelope],
) -> list[str]:
    """Pool + winners must be the envelopes, each exactly once, with their amounts."""
    out: list[str] = []
    seen: dict[int, str] = {}
    holders: list[tuple[str, Envelope]] = [
        *((f"player {u} (Redis)", e) for u, e in sorted(winners.items())),
        *((f"the pool (position {i})", e) for i, e in enumerate(pool)),
    ]
    for holder, envelope in holders:
        seq, amount = envelope.seq, envelope.amount_fen
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
    for user, envelope in sorted(recorded.items()):
        if envelopes.get(envelope.seq) != envelope.amount_fen:
            out.append(
                f"player {user}: PostgreSQL grab of envelope {envelope.seq} is "
                f"{envelope.amount_fen} fen; the envelope is {envelopes.get(envelope.seq)}"
            )
    return out
