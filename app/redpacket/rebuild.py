"""Rebuild a red packet lost from Redis, from PostgreSQL: winners, pool and meta, with its
lifecycle (paused, ended early, closed out) as the drainers recorded it.

A sharded red packet is rebuilt pool by pool: every sub-pool whose meta is missing (its
winners: the recorded grabs of its envelopes, seq % K; its pool: its ungranted envelopes
in seq order; its lifecycle: the campaign's pause and the sub-pool's own close-out) and
the campaign's own meta if that is missing; the live sub-pools are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from app.background.events import publish
from app.errors import OperationError
from app.records import Envelope, Meta, encode_lifecycle
from app.redpacket import pool
from app.redpacket.spec import RedPacket
from app.reports import Totals
from app.store import ledger
from app.store.ledger import Closeout
from app.store.scripts import CampaignKeys


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """What rebuild restored (of a sharded red packet: the sub-pools ``shards``, and the
    campaign's own meta if ``meta``)."""

    campaign_id: str
    winners: Totals
    pool: Totals
    rejects: int
    paused: bool = False
    refunded: Totals | None = None
    shards: tuple[int, ...] = ()
    of_shards: int = 1
    meta: bool = True

    def render(self) -> str:
        """A readable summary."""
        lines = [f"rebuilt campaign {self.campaign_id} from PostgreSQL:"]
        if self.of_shards > 1:
            restored = ", ".join(map(str, self.shards)) or "none"
            lines.append(f"  sub-pools restored: {restored} (of {self.of_shards})")
            if self.meta:
                lines.append("  the campaign's own meta restored")
        lines += [
            f"  winners  {self.winners.count:>10} {self.winners.fen:>14} fen",
            f"  pool     {self.pool.count:>10} {self.pool.fen:>14} fen",
            f"  total    {self.winners.count + self.pool.count:>10} "
            f"{self.winners.fen + self.pool.fen:>14} fen",
        ]
        if self.paused:
            lines.append("  paused (as recorded): resume it to open it again")
        if self.refunded is not None:
            lines.append(
                f"  ended and closed out: {self.refunded.count} envelopes / "
                f"{self.refunded.fen} fen refunded"
            )
        if self.rejects:
            lines.append(f"  warning: {self.rejects} ledger reject(s) not restored; see reconcile")
        return "\n".join(lines)


def _lifecycle(
    campaign: RedPacket, paused: bool, closeout: Closeout | None, rest: Totals, where: str
) -> tuple[Meta, Totals | None]:
    """A pool's lifecycle fields as PostgreSQL recorded them, and its refund if closed."""
    if closeout is None:
        return encode_lifecycle(paused), None
    refunded = Totals(closeout.refunded_count, closeout.refunded_fen)
    if refunded != rest:
        raise OperationError(
            f"PostgreSQL is inconsistent: the close-out{where} refunded {refunded}, "
            f"the ungranted envelopes are {rest}"
        )
    lifecycle = encode_lifecycle(
        paused,
        min(closeout.ended_ms, campaign.closes_ms),
        closeout.closed_ms,
        (refunded.count, refunded.fen),
    )
    return lifecycle, refunded


async def rebuild(redis: Redis, pg: asyncpg.Pool, campaign: RedPacket) -> RebuildResult:
    """Restore a red packet (or the sub-pools of one) lost from Redis, from PostgreSQL."""
    if campaign.spec.shards > 1:
        return await _rebuild_sharded(redis, pg, campaign)
    campaign_id = campaign.id
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
    recorded = await _recorded(pg, campaign)
    closeout = await ledger.fetch_closeout(pg, campaign_id)
    won = Totals.of(e.amount_fen for e in recorded.grabs.values())
    rest = Totals.of(e.amount_fen for e in recorded.left)
    lifecycle, refunded = _lifecycle(campaign, recorded.paused, closeout, rest, "")
    await pool.load(redis, campaign, recorded.left, recorded.grabs)
    await pool.open_campaign(redis, campaign, won, lifecycle)
    # Workers that knew the campaign sold out must ask its script again.
    await publish(redis, "reset", campaign_id)
    return RebuildResult(campaign_id, won, rest, recorded.rejects, recorded.paused, refunded)


@dataclass(frozen=True, slots=True)
class _Recorded:
    """What PostgreSQL recorded of a red packet, checked to make up its budget."""

    grabs: dict[str, Envelope]
    left: list[Envelope]  # ungranted, in seq order: the shuffled order of creation
    rejects: int
    paused: bool


async def _recorded(pg: asyncpg.Pool, campaign: RedPacket) -> _Recorded:
    """The grabs, ungranted envelopes, rejects and pause of ``campaign`` in PostgreSQL;
    OperationError unless grabs + ungranted are exactly its envelopes."""
    grabs = await ledger.fetch_grabs(pg, campaign.id)
    left = await ledger.fetch_ungranted(pg, campaign.id)
    won = Totals.of(e.amount_fen for e in grabs.values())
    rest = Totals.of(e.amount_fen for e in left)
    spec = campaign.spec
    if won + rest != Totals(spec.count, spec.total_fen):
        raise OperationError(
            f"PostgreSQL is inconsistent: grabs {won} + ungranted {rest} != "
            f"{spec.count} envelopes / {spec.total_fen} fen"
        )
    rejects = len(await ledger.fetch_rejects(pg, campaign.id))
    return _Recorded(grabs, left, rejects, await ledger.fetch_paused(pg, campaign.id))


async def _rebuild_sharded(redis: Redis, pg: asyncpg.Pool, campaign: RedPacket) -> RebuildResult:
    """Restore every sub-pool of ``campaign`` whose meta is missing, then its own meta if
    missing; OperationError when none is, or a lost pool's stream still has entries."""
    campaign_id, spec = campaign.id, campaign.spec
    shards = spec.shards
    lost = [k for k, p in enumerate(spec.pools) if not await redis.exists(CampaignKeys.of(p).meta)]
    meta_lost = not await redis.exists(CampaignKeys.of(campaign_id).meta)
    if not lost and not meta_lost:
        raise OperationError(
            f"campaign {campaign_id} is live in Redis (its meta and its {shards} sub-pools' "
            "exist); rebuild only restores what was lost from Redis"
        )
    # Without meta no grab settles in a pool, so its stream cannot grow while we work.
    for k in lost:
        lag = int(await redis.xlen(CampaignKeys.of(spec.pools[k]).ledger))
        if lag:
            raise OperationError(
                f"{lag} ledger entries of campaign {campaign_id}'s shard {k} are still in "
                "Redis, not yet in PostgreSQL; let the drainers record them first"
            )
    recorded = await _recorded(pg, campaign)
    paused = recorded.paused
    closeouts = await ledger.fetch_closeouts(pg, campaign_id)
    winners: list[dict[str, Envelope]] = [{} for _ in range(shards)]
    for user, envelope in recorded.grabs.items():
        winners[envelope.seq % shards][user] = envelope
    dealt = pool.deal(campaign, recorded.left)
    opened: list[tuple[int, pool.SubPool]] = []
    won, rest = Totals(), Totals()
    refunded: Totals | None = None
    # An end the drainers have not recorded for a lost pool (an operator's end while it
    # was missing, or its close-out still in a live stream): what Redis still holds.
    ended = await _live_end(redis, campaign, lost, meta_lost)
    for k in lost:
        taken = Totals.of(e.amount_fen for e in winners[k].values())
        unwon = Totals.of(e.amount_fen for e in dealt[k])
        lifecycle, refund = _lifecycle(campaign, paused, closeouts.get(k), unwon, f" of shard {k}")
        if refund is None and ended is not None:
            # Ended, not closed out: reopened already ended, the drainers close it out.
            lifecycle = encode_lifecycle(paused, min(ended, campaign.closes_ms))
        if refund is not None:
            refunded = (refunded or Totals()) + refund
        opened.append((k, pool.SubPool(taken + unwon, taken, lifecycle)))
        won, rest = won + taken, rest + unwon
    # Validated whole before anything is written: a refusal leaves Redis as it was.
    for k, sub in opened:
        await pool.load_sub_pool(redis, campaign, k, dealt[k], winners[k])
        await pool.open_sub_pool(redis, campaign, k, sub)
    if meta_lost:
        own = _own_lifecycle(campaign, paused, closeouts, ended)
        await pool.open_meta(redis, campaign, lifecycle=own)
    # Sold-out memory is per pool id; the campaign's id resets its lifecycle's.
    for k in lost:
        await publish(redis, "reset", spec.pools[k])
    await publish(redis, "reset", campaign_id)
    return RebuildResult(
        campaign_id, won, rest, recorded.rejects, paused, refunded, tuple(lost), shards, meta_lost
    )


def _own_lifecycle(
    campaign: RedPacket, paused: bool, closeouts: dict[int, Closeout], ended: int | None
) -> Meta:
    """The campaign's own meta's lifecycle: closed once every sub-pool is (an end closes
    the sub-pools first, then the campaign's meta), ended with the last of them; ended
    (the drainers then close it) when only the live sub-pools say so (``ended``)."""
    if len(closeouts) < campaign.spec.shards:
        if ended is not None:
            return encode_lifecycle(paused, min(ended, campaign.closes_ms))
        return encode_lifecycle(paused)
    end = max(c.ended_ms for c in closeouts.values())
    closed = max(c.closed_ms for c in closeouts.values())
    return encode_lifecycle(paused, min(end, campaign.closes_ms), closed)


async def _live_end(
    redis: Redis, campaign: RedPacket, lost: list[int], meta_lost: bool
) -> int | None:
    """When the campaign ended, by the pools Redis still holds: the latest end of those
    closed out (its own meta, its live sub-pools); None if none is."""
    live = [p for k, p in enumerate(campaign.spec.pools) if k not in lost]
    if not meta_lost:
        live.append(campaign.id)
    ends = []
    for pool_id in live:
        end, closed = await redis.hmget(CampaignKeys.of(pool_id).meta, "ends_at_ms", "closed_ms")
        if closed is not None and end is not None:
            ends.append(int(end))
    return max(ends, default=None)
