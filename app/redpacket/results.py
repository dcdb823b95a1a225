"""A red packet's public results (手气最佳, 看看大家的手气), once it has given out.

A red packet is finished once no grab can settle any more: its pool is empty (sold out),
or it is closed out (meta ``closed_ms``: by an operator's end, or by a drainer once Redis's
clock has passed its end; the grab script refuses from then on). Its results are final
once, besides, the ledger has caught up (the drainers XDEL what they commit, so an empty
stream means PostgreSQL holds every grant, and the close-out's record): from then on they
never change. All of it is read in one MULTI of the campaign's own keys (no TIME, which a
Redis Cluster refuses in a MULTI), so no grab can settle between the reads.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from redis.asyncio import Redis

from app.model import recorded_at
from app.redpacket.spec import RedPacket, pools_of
from app.redpacket.split import Split
from app.store import results
from app.store.scripts import CampaignKeys

# How many of the latest envelopes everyone sees (latest first).
WINNERS_SHOWN = 20


async def finished(redis: Redis, campaign: RedPacket) -> str | None:
    """``sold_out`` or ``ended`` once no grab can settle and PostgreSQL holds every
    grant; None before (still open, paused or scheduled, or the ledger still lags).
    A sharded red packet is finished once each of its sub-pools is: ended once every
    one is closed out, sold out once every one is empty."""
    pools = pools_of(campaign)
    async with redis.pipeline(transaction=len(pools) == 1) as pipe:
        for pool_id in pools:
            keys = CampaignKeys.of(pool_id)
            pipe.hmget(keys.meta, "kind", "closed_ms")
            pipe.llen(keys.pool)
            pipe.xlen(keys.ledger)
        replies = await pipe.execute()
    closed = remaining = 0
    per_pool = zip(replies[0::3], replies[1::3], replies[2::3], strict=True)
    for (kind, closed_ms), left, lag in per_pool:
        if kind is None or lag:
            # No meta: lost from Redis (until a rebuild) or still loading.
            return None
        closed += closed_ms is not None
        remaining += int(left)
    if closed == len(pools):
        return "ended"
    return "sold_out" if remaining == 0 else None


def _winner(winner: results.Winner) -> dict[str, Any]:
    return {
        "name": winner.name,
        "amount_fen": winner.amount_fen,
        "granted_at": recorded_at(winner.at_ms),
    }


async def tally(redis: Redis, pg: asyncpg.Pool, campaign: RedPacket) -> dict[str, Any] | None:
    """The final results, or None while the red packet is not finished (see finished).

    ``best`` is the largest envelope (ties: the earliest), null without winners and for
    a fixed split, where every envelope is the same (WeChat's 普通红包 shows none either).
    """
    state = await finished(redis, campaign)
    if state is None:
        return None
    spec = campaign.spec
    counted = await results.red_packet(pg, campaign.id, WINNERS_SHOWN)
    fixed = spec.split is Split.FIXED
    return {
        "kind": str(campaign.kind),
        "state": state,
        "split": str(spec.split),
        "count": spec.count,
        "total_fen": spec.total_fen,
        "best": None if counted.best is None or fixed else _winner(counted.best),
        "winners": [_winner(w) for w in counted.latest],
        "won_count": counted.won_count,
        "won_fen": counted.won_fen,
    }
