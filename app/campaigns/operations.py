"""Operator commands over a campaign's two stores, each handed to the campaign's kind.

``reconcile`` proves the books balance on a live campaign. The stream holds exactly the
entries not committed to PostgreSQL yet (drainers commit, then XACK + XDEL), so every
event settled before a moment T is, at T, either in the stream or already in
PostgreSQL. Each kind's reconcile therefore reads:

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

A sharded red packet's sub-pools live in slots of their own, and a MULTI cannot span
slots on a Redis Cluster: step 2 is then one snapshot per sub-pool (each a MULTI within
its slot), all taken between 1 and 3, so the argument holds for each sub-pool (each
event settles in exactly one sub-pool, and 1 precedes every snapshot).

``rebuild`` restores a red packet lost from Redis from PostgreSQL: of a sharded one,
every sub-pool whose meta is missing, and its own meta if missing.
"""

from __future__ import annotations

from typing import Any, Protocol

import asyncpg
from redis.asyncio import Redis

from app.campaigns import definitions
from app.errors import OperationError
from app.lottery import reconcile as lottery
from app.model import Campaign, Kind
from app.payout import reconcile as payout
from app.payout.client import WeChatPayClient
from app.records import MalformedRecord
from app.redpacket import rebuild as red_packet_rebuild
from app.redpacket import reconcile as red_packet
from app.store import ledger


class Report(Protocol):
    """What an operator command prints, and whether it found the books in order."""

    mismatches: list[str]

    @property
    def ok(self) -> bool:
        """True when nothing disagrees."""

    def render(self) -> str:
        """A readable report."""


async def definition(pg: asyncpg.Pool, campaign_id: str) -> Campaign[Any]:
    """The campaign as PostgreSQL records it; OperationError when unknown."""
    row = await ledger.fetch_campaign(pg, campaign_id)
    if row is None:
        raise OperationError(f"no campaign {campaign_id!r} in PostgreSQL")
    try:
        return definitions.from_row(row)
    except MalformedRecord as exc:
        raise OperationError(str(exc)) from None


class WithPayouts:
    """A kind's report followed by the payouts' (app.payout.reconcile)."""

    def __init__(self, grants: Report, payouts: payout.PayoutReport) -> None:
        self.grants = grants
        self.payouts = payouts
        self.mismatches = [*grants.mismatches, *payouts.mismatches]

    @property
    def ok(self) -> bool:
        """True when neither report found anything wrong."""
        return not self.mismatches

    def render(self) -> str:
        """Both reports, the grants' first."""
        return f"{self.grants.render()}\n\n{self.payouts.render()}"


async def reconcile(
    redis: Redis, pg: asyncpg.Pool, campaign_id: str, wechat: WeChatPayClient | None = None
) -> Report:
    """Compare a campaign in Redis and PostgreSQL (see the module docstring), then its
    payouts with its grants and, given a client, with WeChat Pay."""
    campaign = await definition(pg, campaign_id)
    grants: Report
    if campaign.kind is Kind.LOTTERY:
        grants = await lottery.reconcile(redis, pg, campaign)
    else:
        grants = await red_packet.reconcile(redis, pg, campaign)
    return WithPayouts(grants, await payout.reconcile(pg, campaign_id, wechat))


async def rebuild(
    redis: Redis, pg: asyncpg.Pool, campaign_id: str
) -> red_packet_rebuild.RebuildResult:
    """Restore a red packet (or the lost sub-pools of a sharded one) lost from Redis, from
    PostgreSQL."""
    campaign = await definition(pg, campaign_id)
    if campaign.kind is not Kind.RED_PACKET:
        raise OperationError(f"campaign {campaign_id} is a {campaign.kind}; only red packets")
    return await red_packet_rebuild.rebuild(redis, pg, campaign)
