"""Reconcile a red packet: Redis's pool and winners against PostgreSQL's envelopes and grabs.

See app.campaigns.operations for why a live campaign gives no false mismatch: PostgreSQL
is read first, then one MULTI snapshot of Redis, then PostgreSQL again for exactly the
winners the snapshot counts that neither read found.

Once the campaign is closed out (meta ``closed_ms``), its refund must make up the
budget: won + refunded == total, in count and fen, both in Redis and in the ledger
(grants and the close-out, recorded or in flight); the refund is exactly the pool left.

A sharded red packet ("shards": K) is compared sub-pool by sub-pool: sub-pool k holds
the envelopes of seq % K == k, so its winners, pool, stream and close-out are checked
against PostgreSQL's envelopes, grabs and close-out of those seqs, and each sub-pool's
refund makes up its own budget. A MULTI cannot span the sub-pools' slots on a Redis
Cluster, so each sub-pool is one snapshot of its own, all of them between the two reads
of PostgreSQL: whatever the first read found was settled before every snapshot, and the
second asks only for winners some snapshot counts. Across sub-pools: every envelope is
held exactly once, in its own sub-pool, and no player is a winner in two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
from app.redpacket.spec import RedPacket, pools_of
from app.reports import Totals, closeout_count, conclusion, listed, table
from app.store import ledger
from app.store.ledger import Closeout
from app.store.scripts import CampaignKeys

Stream = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass(frozen=True, slots=True)
class ShardLine:
    """One sub-pool of a sharded red packet, as its report shows it."""

    shard: int
    pool_id: str
    winners: Totals
    pool: Totals
    refunded: Totals | None
    lag: int
    missing: bool


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
    # A sharded red packet's sub-pools (empty when not sharded).
    shards: list[ShardLine] = field(default_factory=list)

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
        ]
        if self.shards:
            lines.append(f"sub-pools ({len(self.shards)}), in Redis:")
            lines.append(table(map(_shard_row, self.shards), SHARD_HEADERS, indent="  "))
        lines += [
            f"ledger lag: {self.ledger_lag} stream entries not yet in PostgreSQL "
            "(in flight, not mismatches)",
            f"ledger rejects: {self.rejects}",
            *conclusion(self.mismatches),
        ]
        return "\n".join(lines)


SHARD_HEADERS = ("shard", "winners", "fen", "pool", "fen", "refunded", "fen", "lag", "meta", "keys")


def _shard_row(line: ShardLine) -> tuple[object, ...]:
    refunded = line.refunded or Totals()
    return (
        line.shard,
        line.winners.count,
        line.winners.fen,
        line.pool.count,
        line.pool.fen,
        None if line.refunded is None else refunded.count,
        None if line.refunded is None else refunded.fen,
        line.lag,
        "missing" if line.missing else "ok",
        f"hb:{{{line.pool_id}}}:*",
    )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One pool as one MULTI read it."""

    shard: int
    pool_id: str
    exists: bool
    counted: Totals
    budget: Totals
    refunded: Totals | None
    winners: dict[str, Envelope]
    pool: list[Envelope]
    stream: Stream


async def _snapshot(redis: Redis, pool_id: str, shard: int) -> _Snapshot:
    """The pool's meta counters, winners, envelopes and ledger stream, atomically."""
    keys = CampaignKeys.of(pool_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.exists(keys.meta)
        pipe.hmget(keys.meta, "won_count", "won_fen", "count", "total_fen")
        pipe.hmget(keys.meta, "closed_ms", "refunded_count", "refunded_fen")
        pipe.hgetall(keys.winners)
        pipe.lrange(keys.pool, 0, -1)
        pipe.xrange(keys.ledger)
        exists, counters, closed, raw_winners, raw_pool, stream = await pipe.execute()
    won_count, won_fen, count, total_fen = (int(v or 0) for v in counters)
    return _Snapshot(
        shard,
        pool_id,
        bool(exists),
        Totals(won_count, won_fen),
        Totals(count, total_fen),
        None if closed[0] is None else Totals(int(closed[1] or 0), int(closed[2] or 0)),
        {u.decode(): Envelope.decode(v) for u, v in raw_winners.items()},
        [Envelope.decode(v) for v in raw_pool],
        stream,
    )


def _in_flight(
    campaign_id: str,
    stream: Stream,
    mismatches: list[str],
    closeouts: list[CloseoutRecord],
    shard: int = 0,
    where: str = "",
) -> dict[str, Envelope]:
    """The grants in the ledger stream (its close-out into ``closeouts``, pauses
    skipped); any other entry is a mismatch."""
    out: dict[str, Envelope] = {}
    for raw_id, fields in stream:
        try:
            record = LedgerEntry.of(campaign_id, raw_id, fields, shard).decode()
        except MalformedRecord as exc:
            mismatches.append(f"{where}ledger stream entry {raw_id.decode()}: {exc}")
            continue
        if isinstance(record, GrabRecord):
            out[record.openid] = record.envelope
        elif isinstance(record, CloseoutRecord) and record.tiers is None:
            closeouts.append(record)
        elif not isinstance(record, PauseRecord):
            mismatches.append(f"{where}ledger stream entry {record.stream_id} is not a grant")
    return out


async def reconcile(redis: Redis, pg: asyncpg.Pool, campaign: RedPacket) -> ReconcileReport:
    """Compare a red packet in Redis and PostgreSQL (sub-pool by sub-pool when sharded)."""
    campaign_id = campaign.id
    shards = campaign.spec.shards
    envelopes = {e.seq: e.amount_fen for e in await ledger.fetch_envelopes(pg, campaign_id)}
    report = ReconcileReport(campaign_id, campaign.name, Totals.of(envelopes.values()))
    mismatches = report.mismatches
    recorded = await ledger.fetch_grabs(pg, campaign_id)
    closeouts = await ledger.fetch_closeouts(pg, campaign_id)
    # The campaign's own meta of a sharded one: only its presence matters here (it holds
    # no envelopes, and its lifecycle mirrors the sub-pools').
    own = shards == 1 or bool(await redis.exists(CampaignKeys.of(campaign_id).meta))
    snaps = [await _snapshot(redis, p, k) for k, p in enumerate(pools_of(campaign))]

    def where(shard: int) -> str:
        return f"shard {shard}: " if shards > 1 else ""

    in_stream: list[list[CloseoutRecord]] = [[] for _ in snaps]
    in_flight = [
        _in_flight(campaign_id, s.stream, mismatches, in_stream[s.shard], s.shard, where(s.shard))
        for s in snaps
    ]
    flying = {u for grants in in_flight for u in grants}
    unseen = [u for s in snaps for u in s.winners if u not in recorded and u not in flying]
    if unseen:
        recorded.update(await ledger.fetch_grabs(pg, campaign_id, unseen))
    if any(
        s.refunded is not None and s.shard not in closeouts and not in_stream[s.shard]
        for s in snaps
    ):
        # Recorded (and deleted from the stream) between the first read and the snapshot.
        closeouts = await ledger.fetch_closeouts(pg, campaign_id)
    rejects = await ledger.fetch_rejects(pg, campaign_id)

    # Each sub-pool's recorded grabs, and its grants in flight only.
    mine: list[dict[str, Envelope]] = [{} for _ in snaps]
    for user, envelope in recorded.items():
        mine[envelope.seq % shards][user] = envelope
    flown = [
        Totals.of(e.amount_fen for u, e in grants.items() if u not in recorded)
        for grants in in_flight
    ]

    report.redis_winners = _sum(Totals.of(e.amount_fen for e in s.winners.values()) for s in snaps)
    report.pg_grabs = Totals.of(e.amount_fen for e in recorded.values())
    report.in_flight = _sum(flown)
    report.pool = _sum(Totals.of(e.amount_fen for e in s.pool) for s in snaps)
    report.ledger_lag = sum(len(s.stream) for s in snaps)
    report.rejects = len(rejects)
    if shards > 1:
        report.shards = [
            ShardLine(
                s.shard,
                s.pool_id,
                Totals.of(e.amount_fen for e in s.winners.values()),
                Totals.of(e.amount_fen for e in s.pool),
                s.refunded,
                len(s.stream),
                not s.exists,
            )
            for s in snaps
        ]

    if shards == 1 and not snaps[0].exists:
        # Everything below would only restate this, player by player.
        mismatches.append("campaign missing from Redis (lost?): run `rebuild`")
        return report
    if not own:
        mismatches.append("the campaign's meta is missing from Redis (lost?): run `rebuild`")
    for s in snaps:
        if not s.exists:
            # Its players and envelopes would only restate this.
            mismatches.append(f"{where(s.shard)}sub-pool missing from Redis (lost?): run `rebuild`")
    present = [s for s in snaps if s.exists]
    budgets = [Totals() for _ in snaps]
    for seq, amount in envelopes.items():
        budgets[seq % shards] += Totals(1, amount)
    for s in present:
        winners = Totals.of(e.amount_fen for e in s.winners.values())
        if s.counted != winners:
            mismatches.append(
                f"{where(s.shard)}Redis meta says {s.counted.count} won / {s.counted.fen} fen, "
                f"winners hash has {winners.count} / {winners.fen} fen"
            )
        if shards > 1 and s.budget != budgets[s.shard]:
            mismatches.append(
                f"{where(s.shard)}Redis meta's budget is {s.budget.count} / {s.budget.fen} "
                f"fen, its envelopes in PostgreSQL {budgets[s.shard].count} / "
                f"{budgets[s.shard].fen} fen"
            )
    mismatches.extend(_player_mismatches(present, recorded, in_flight, shards, where))
    mismatches.extend(_envelope_mismatches(envelopes, present, recorded, shards, where))
    if shards == 1:
        budgets[0] = Totals(campaign.spec.count, campaign.spec.total_fen)
    refunds: list[Totals] = []
    ledger_refunds: list[Totals] = []
    for s in present:
        found = [Totals(c.refunded_count, c.refunded_fen) for c in in_stream[s.shard]]
        if s.shard in closeouts:
            found.append(_refund(closeouts[s.shard]))
        if s.refunded is not None:
            refunds.append(s.refunded)
        if found:
            ledger_refunds.append(found[0])
        mismatches.extend(
            where(s.shard) + m
            for m in _closeout_mismatches(
                budgets[s.shard],
                Totals.of(e.amount_fen for e in s.winners.values()),
                Totals.of(e.amount_fen for e in mine[s.shard].values()) + flown[s.shard],
                Totals.of(e.amount_fen for e in s.pool),
                s.refunded,
                found,
            )
        )
    if refunds:
        report.refunded = _sum(refunds)
    if ledger_refunds:
        report.ledger_refund = _sum(ledger_refunds)
    if shards > 1 and len(refunds) == len(ledger_refunds) == len(snaps):
        # Every sub-pool closed out, in both stores.
        budget = Totals(campaign.spec.count, campaign.spec.total_fen)
        checks = [
            ("Redis", report.redis_winners, _sum(refunds)),
            ("ledger", report.pg_grabs + report.in_flight, _sum(ledger_refunds)),
        ]
        mismatches.extend(_overall(budget, checks))
    mismatches.extend(
        f"ledger reject {r['stream_id']} ({r['kind']}): {r['reason']} {r['fields']}"
        for r in rejects
    )
    return report


def _sum(totals: Iterable[Totals]) -> Totals:
    out = Totals()
    for t in totals:
        out += t
    return out


def _refund(closeout: Closeout) -> Totals:
    return Totals(closeout.refunded_count, closeout.refunded_fen)


def _overall(budget: Totals, checks: list[tuple[str, Totals, Totals]]) -> list[str]:
    """Every sub-pool closed out: together they make up the campaign's ``budget``, in
    each store of ``checks`` (store, won, refunded)."""
    return [
        f"all sub-pools, {store}: won {won.count} / {won.fen} fen + refunded "
        f"{refunded.count} / {refunded.fen} fen != {budget.count} envelopes / "
        f"{budget.fen} fen"
        for store, won, refunded in checks
        if won + refunded != budget
    ]


def _player_mismatches(
    present: list[_Snapshot],
    recorded: dict[str, Envelope],
    in_flight: list[dict[str, Envelope]],
    shards: int,
    where: Callable[[int], str],
) -> list[str]:
    """Each Redis winner recorded (or in flight) with the same envelope, each recorded
    grab a winner of its envelope's sub-pool, nobody a winner in two sub-pools."""
    out: list[str] = []
    won_in: dict[str, list[int]] = {}
    for s in present:
        flying = in_flight[s.shard]
        for user, grant in sorted(s.winners.items()):
            won_in.setdefault(user, []).append(s.shard)
            if user in recorded:
                if recorded[user] != grant:
                    out.append(
                        f"{where(s.shard)}player {user}: Redis {grant}, PostgreSQL {recorded[user]}"
                    )
            elif user in flying:
                if flying[user] != grant:
                    out.append(
                        f"{where(s.shard)}player {user}: Redis {grant}, "
                        f"ledger stream {flying[user]}"
                    )
            else:
                out.append(
                    f"{where(s.shard)}player {user}: won {grant} in Redis, "
                    "not in PostgreSQL nor in flight"
                )
    by_shard = {s.shard: s for s in present}
    for user, grant in sorted(recorded.items()):
        holder = by_shard.get(grant.seq % shards)
        if holder is not None and user not in holder.winners:
            out.append(
                f"{where(holder.shard)}player {user}: recorded in PostgreSQL ({grant}), "
                "not a Redis winner"
            )
    for s in present:
        for user in sorted(set(in_flight[s.shard]) - set(s.winners)):
            out.append(f"{where(s.shard)}player {user}: in the ledger stream, not a Redis winner")
    for user, where_won in sorted(won_in.items()):
        if len(where_won) > 1:
            out.append(
                f"player {user}: a Redis winner in shards {', '.join(map(str, where_won))} "
                "(at most one sub-pool)"
            )
    return out


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
    present: list[_Snapshot],
    recorded: dict[str, Envelope],
    shards: int,
    where: Callable[[int], str],
) -> list[str]:
    """Pools + winners must be the envelopes, each exactly once, with their amounts, each
    in its own sub-pool (seq % shards)."""
    out: list[str] = []
    seen: dict[int, tuple[int, str]] = {}
    for s in present:
        holders: list[tuple[str, Envelope]] = [
            *((f"player {u} (Redis)", e) for u, e in sorted(s.winners.items())),
            *((f"the pool (position {i})", e) for i, e in enumerate(s.pool)),
        ]
        here = where(s.shard)
        for holder, envelope in holders:
            seq, amount = envelope.seq, envelope.amount_fen
            if seq not in envelopes:
                out.append(f"{here}{holder} holds envelope {seq}, which does not exist")
                continue
            if envelopes[seq] != amount:
                out.append(
                    f"{here}{holder} holds envelope {seq} as {amount} fen; it is {envelopes[seq]}"
                )
            if seq % shards != s.shard:
                out.append(
                    f"{here}{holder} holds envelope {seq}, which belongs to shard {seq % shards}"
                )
            if seq in seen:
                first_shard, first = seen[seq]
                if first_shard != s.shard:
                    first = f"{first} in shard {first_shard}"
                out.append(f"{here}envelope {seq} is held twice: by {first} and by {holder}")
            seen[seq] = (s.shard, holder)
    for s in present:
        lost = [q for q in envelopes if q % shards == s.shard and q not in seen]
        if lost:
            out.append(
                f"{where(s.shard)}{len(lost)} envelope(s) neither in the pool nor won: "
                f"{listed(lost)}"
            )
    for user, envelope in sorted(recorded.items()):
        if envelopes.get(envelope.seq) != envelope.amount_fen:
            out.append(
                f"{where(envelope.seq % shards)}player {user}: PostgreSQL grab of envelope "
                f"{envelope.seq} is {envelope.amount_fen} fen; the envelope is "
                f"{envelopes.get(envelope.seq)}"
            )
    return out
