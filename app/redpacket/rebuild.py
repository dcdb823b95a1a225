"""Rebuild a red packet lost from Redis, from PostgreSQL: winners, pool and meta, with its
lifecycle (paused, ended early, closed out) as the drainers recorded it."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from app.background.events import publish
from app.errors import OperationError
from app.records import encode_lifecycle
from app.redpacket import pool
from app.redpacket.spec import RedPacket
from app.reports import Totals
from app.store import ledger
from app.store.scripts import CampaignKeys


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """What rebuild restored."""

    campaign_id: str
    winners: Totals
    pool: Totals
    rejects: int
    paused: bool = False
    refunded: Totals | None = None

    def render(self) -> str:
        """A readable summary."""
        lines = [
            f"rebuilt campaign {self.campaign_id} from PostgreSQL:",
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


async def rebuild(redis: Redis, pg: asyncpg.Pool, campaign: RedPacket) -> RebuildResult:
    """Restore a red packet lost from Redis, from PostgreSQL."""
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
    grabs = await ledger.fetch_grabs(pg, campaign_id)
    # Envelopes go back in seq order, which is the shuffled order of creation.
    left = await ledger.fetch_ungranted(pg, campaign_id)
    rejects = len(await ledger.fetch_rejects(pg, campaign_id))
    paused = await ledger.fetch_paused(pg, campaign_id)
    closeout = await ledger.fetch_closeout(pg, campaign_id)
    won = Totals.of(e.amount_fen for e in grabs.values())
    rest = Totals.of(e.amount_fen for e in left)
    spec = campaign.spec
    if won + rest != Totals(spec.count, spec.total_fen):
        raise OperationError(
            f"PostgreSQL is inconsistent: grabs {won} + ungranted {rest} != "
            f"{spec.count} envelopes / {spec.total_fen} fen"
        )
    lifecycle = encode_lifecycle(paused)
    refunded = None
    if closeout is not None:
        refunded = Totals(closeout.refunded_count, closeout.refunded_fen)
        if refunded != rest:
            raise OperationError(
                f"PostgreSQL is inconsistent: the close-out refunded {refunded}, "
                f"the ungranted envelopes are {rest}"
            )
        lifecycle = encode_lifecycle(
            paused,
            min(closeout.ended_ms, campaign.closes_ms),
            closeout.closed_ms,
            (refunded.count, refunded.fen),
        )
    await pool.load(redis, campaign, left, grabs)
    await pool.open_campaign(redis, campaign, won, lifecycle)
    # Workers that knew the campaign sold out must ask its script again.
    await publish(redis, "reset", campaign_id)
    return RebuildResult(campaign_id, won, rest, rejects, paused, refunded)
