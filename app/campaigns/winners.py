"""Who won what, for finance: one row per grant (red packet) or per prize (lottery),
streamed from PostgreSQL with each grant's payout state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.campaigns import definitions
from app.errors import NotFound
from app.model import Campaign, Kind, rfc3339
from app.store import ledger, reads

Row = Sequence[str | int]

RED_PACKET_COLUMNS = ("openid", "amount_fen", "granted_at", "payout_state")
LOTTERY_COLUMNS = ("openid", "draw_no", "tier", "prize", "value_fen", "drawn_at", "payout_state")


@dataclass(frozen=True, slots=True)
class Winners:
    """A campaign's winners: the header and the rows, in batches, as PostgreSQL sends them."""

    campaign_id: str
    header: tuple[str, ...]
    batches: AsyncGenerator[list[Row], None]


# Each closes the store's stream it reads when it is closed itself (the download ended
# early): the connection goes back to the pool at once, not when collected.


async def _grants(pool: asyncpg.Pool, campaign_id: str) -> AsyncGenerator[list[Row], None]:
    async with contextlib.aclosing(reads.grants(pool, campaign_id)) as batches:
        async for rows in batches:
            yield [
                (r["openid"], r["amount_fen"], rfc3339(r["granted_at"]), r["payout_state"] or "")
                for r in rows
            ]


async def _prizes(pool: asyncpg.Pool, campaign: Campaign[Any]) -> AsyncGenerator[list[Row], None]:
    tiers = campaign.spec.tiers
    async with contextlib.aclosing(reads.prizes(pool, campaign.id)) as batches:
        async for rows in batches:
            yield [
                (
                    r["openid"],
                    r["draw_no"],
                    r["tier"],
                    tiers[r["tier"]].name,
                    r["value_fen"],
                    rfc3339(r["drawn_at"]),
                    r["payout_state"] or "",
                )
                for r in rows
            ]


async def winners(pool: asyncpg.Pool, campaign_id: str) -> Winners:
    """The winners of ``campaign_id`` (404 if PostgreSQL has no such campaign)."""
    # Ids are 16 hex digits; a NUL (which PostgreSQL's text refuses) or a long one is none.
    valid = 0 < len(campaign_id) <= 64 and "\x00" not in campaign_id
    row = await ledger.fetch_campaign(pool, campaign_id) if valid else None
    if row is None:
        raise NotFound("no such campaign")
    campaign = definitions.from_row(row)
    if campaign.kind is Kind.LOTTERY:
        return Winners(campaign.id, LOTTERY_COLUMNS, _prizes(pool, campaign))
    return Winners(campaign.id, RED_PACKET_COLUMNS, _grants(pool, campaign.id))
