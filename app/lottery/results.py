"""A lottery's public results: its prize list with what has been won, and the latest
prize winners. Available at any time; they change with every prize, so they are
computed from PostgreSQL's draws (the ledger, a drain behind Redis) a few seconds apart.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.lottery.spec import Lottery
from app.model import recorded_at
from app.store import results

# How many of the latest prize winners everyone sees (latest first).
WINNERS_SHOWN = 20


async def tally(pg: asyncpg.Pool, campaign: Lottery, state: str) -> dict[str, Any]:
    """Prizes (tier, name, value, stock, won so far) and the latest prize winners."""
    spec = campaign.spec
    counted = await results.lottery(pg, campaign.id, WINNERS_SHOWN)
    prizes = [
        {**spec.prize(i), "stock": tier.stock, "won": counted.won.get(i, 0)}
        for i, tier in enumerate(spec.tiers)
    ]
    winners = [
        {
            "name": w.name,
            "tier": w.tier,
            "prize": spec.tiers[w.tier].name,
            "value_fen": spec.tiers[w.tier].value_fen,
            "drawn_at": recorded_at(w.at_ms),
        }
        for w in counted.latest
    ]
    return {
        "kind": str(campaign.kind),
        "state": state,
        "prizes": prizes,
        "winners": winners,
        "won_count": sum(p["won"] for p in prizes),
    }
