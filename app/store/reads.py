"""PostgreSQL reads for operators: pages of campaigns, and winners streamed for export."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime

import asyncpg

# Newest first, by the index campaigns_newest; a page continues strictly after the last
# row of the previous one, (created_at, id) being unique.
_PAGE = "SELECT * FROM campaigns WHERE {where} ORDER BY created_at DESC, id DESC LIMIT $1"
CAMPAIGNS_FIRST = _PAGE.format(where="($2::text IS NULL OR kind = $2)")
CAMPAIGNS_AFTER = _PAGE.format(
    where="($2::text IS NULL OR kind = $2) AND (created_at, id) < ($3::timestamptz, $4::text)"
)

# One row per grant with its payout bill's state (NULL without one), oldest first, read
# in one REPEATABLE READ snapshot so the export is consistent.
GRANTS = """
SELECT g.openid, g.amount_fen, g.granted_at, p.state AS payout_state
FROM grabs g
LEFT JOIN payouts p ON p.campaign_id = g.campaign_id AND p.openid = g.openid
                   AND p.grant_kind = 'grab' AND p.grant_no = g.seq
WHERE g.campaign_id = $1
ORDER BY g.granted_at, g.seq
"""
PRIZES = """
SELECT d.openid, d.draw_no, d.tier, d.value_fen, d.drawn_at, p.state AS payout_state
FROM draws d
LEFT JOIN payouts p ON p.campaign_id = d.campaign_id AND p.openid = d.openid
                   AND p.grant_kind = 'draw' AND p.grant_no = d.draw_no
WHERE d.campaign_id = $1 AND d.tier IS NOT NULL
ORDER BY d.drawn_at, d.openid, d.draw_no
"""
# Rows fetched from the server cursor at a time: memory stays bounded whatever the size.
STREAM_BATCH = 2000


async def campaigns_page(
    pool: asyncpg.Pool, limit: int, kind: str | None, after: tuple[datetime, str] | None
) -> list[asyncpg.Record]:
    """Up to ``limit`` campaign rows (of ``kind``), newest first, after ``after``."""
    if after is None:
        return await pool.fetch(CAMPAIGNS_FIRST, limit, kind)
    return await pool.fetch(CAMPAIGNS_AFTER, limit, kind, *after)


async def _stream(
    pool: asyncpg.Pool, query: str, campaign_id: str
) -> AsyncGenerator[list[asyncpg.Record], None]:
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        cursor = await conn.cursor(query, campaign_id)
        while rows := await cursor.fetch(STREAM_BATCH):
            yield rows


def grants(pool: asyncpg.Pool, campaign_id: str) -> AsyncGenerator[list[asyncpg.Record], None]:
    """A red packet's grants with their payout state, in batches, oldest first."""
    return _stream(pool, GRANTS, campaign_id)


def prizes(pool: asyncpg.Pool, campaign_id: str) -> AsyncGenerator[list[asyncpg.Record], None]:
    """A lottery's prizes (draws that won a tier) with their payout state, in batches."""
    return _stream(pool, PRIZES, campaign_id)
