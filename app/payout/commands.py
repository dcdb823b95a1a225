"""The payout commands' work: ``payout-retry`` (``payout`` is app.payout.worker)."""

from __future__ import annotations

import asyncpg

from app.store import payouts


async def retry(database_url: str, campaign_id: str) -> list[str]:
    """Give every FAIL or CANCELLED bill of a campaign a new attempt under a new number
    (the old one is final at WeChat Pay); the new numbers."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        return await payouts.retry_failed(pool, campaign_id)
    finally:
        await pool.close()
