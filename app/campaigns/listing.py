"""The operators' campaign list: pages of PostgreSQL's campaigns, each with its live state.

Definitions come from PostgreSQL (their source of truth, and no per-worker cache fills
up with every campaign ever listed); live state and counters from Redis, one pipeline
per page: a red packet's lifecycle (paused, ended early, closed out), counters and pool
length, a lottery's lifecycle and per-tier counters, and Redis's clock, which decides
windows; the state is then computed as every view computes it (``Campaign.state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis

from app.campaigns import definitions
from app.model import Kind, rfc3339
from app.records import LIFECYCLE_FIELDS, lifecycle_of
from app.redpacket.spec import pools_of
from app.store import reads
from app.store.scripts import CampaignKeys

# Each step of a filtered listing reads this many rows at least, and a page examines at
# most LIST_SCAN_MAX: a page of a rare state may hold fewer than ``limit`` campaigns
# (``next`` then continues the scan), but never costs more than that.
LIST_CHUNK = 50
LIST_SCAN_MAX = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ends: the (created_at, id) of its last campaign."""

    created_us: int
    campaign_id: str

    @classmethod
    def of(cls, row: asyncpg.Record) -> Position:
        """The position of a campaigns row."""
        return cls((row["created_at"] - _EPOCH) // _US, row["id"])

    def key(self) -> tuple[datetime, str]:
        """The (created_at, id) the next page starts strictly after."""
        return _EPOCH + self.created_us * _US, self.campaign_id


async def summaries(redis: Redis, rows: Sequence[asyncpg.Record]) -> list[dict[str, Any]]:
    """The list entry of each campaigns row, its live part read in one pipeline."""
    campaigns = [definitions.from_row(row) for row in rows]
    # Redis's clock first, apart: a Redis Cluster's pipeline refuses TIME.
    seconds, micros = await redis.time()
    now = seconds * 1000 + micros // 1000
    async with redis.pipeline(transaction=False) as pipe:
        for campaign in campaigns:
            keys = CampaignKeys.of(campaign.id)
            pipe.hmget(keys.meta, *LIFECYCLE_FIELDS)
            if campaign.kind is Kind.RED_PACKET:
                # A sharded red packet counts in its sub-pools.
                for pool_id in pools_of(campaign):
                    pool_keys = CampaignKeys.of(pool_id)
                    pipe.hmget(pool_keys.meta, "won_count", "won_fen")
                    pipe.llen(pool_keys.pool)
            else:
                pipe.hgetall(keys.tiers)
        replies = await pipe.execute()
    out, at = [], 0
    for row, campaign in zip(rows, campaigns, strict=True):
        meta = replies[at]
        if campaign.kind is Kind.RED_PACKET:
            shards = len(pools_of(campaign))
            per_pool = replies[at + 1 : at + 1 + 2 * shards]
            won_count = sum(int(c or 0) for c, _ in per_pool[0::2])
            won_fen = sum(int(f or 0) for _, f in per_pool[0::2])
            left = sum(int(n) for n in per_pool[1::2])
            at += 1 + 2 * shards
            entry = {
                **campaign.summary(campaign.state(now, left, lifecycle_of(meta))),
                "total_fen": campaign.spec.total_fen,
                "count": campaign.spec.count,
                "won_count": won_count,
                "won_fen": won_fen,
            }
        else:
            tiers = replies[at + 1]
            at += 2
            entry = {
                **campaign.summary(campaign.state(now, None, lifecycle_of(meta))),
                "tiers": len(campaign.spec.tiers),
                "stock": sum(t.stock for t in campaign.spec.tiers),
                "prizes_won": sum(int(v) for k, v in tiers.items() if k.startswith(b"won:")),
            }
        entry["created_at"] = rfc3339(row["created_at"])
        out.append(entry)
    return out


async def page(
    redis: Redis,
    pg: asyncpg.Pool,
    *,
    limit: int,
    state: str | None = None,
    kind: Kind | None = None,
    after: Position | None = None,
) -> tuple[list[dict[str, Any]], Position | None]:
    """Up to ``limit`` campaigns (in ``state``, of ``kind``) newest first after ``after``,
    and where the next page starts (None: no campaign is left)."""
    found: list[dict[str, Any]] = []
    examined = 0
    while True:
        want = limit - len(found)
        chunk = want if state is None else max(want, LIST_CHUNK)
        rows = await reads.campaigns_page(
            pg,
            chunk + 1,
            None if kind is None else str(kind),
            None if after is None else after.key(),
        )
        batch = rows[:chunk]
        for i, (row, entry) in enumerate(zip(batch, await summaries(redis, batch), strict=True)):
            after = Position.of(row)
            examined += 1
            if state is None or entry["state"] == state:
                found.append(entry)
                if len(found) == limit:
                    return found, after if i + 1 < len(rows) else None
        if len(rows) <= chunk:
            return found, None
        if examined >= LIST_SCAN_MAX:
            return found, after
