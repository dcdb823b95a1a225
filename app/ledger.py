"""PostgreSQL: migrations and the durable records. Transactions open here and nowhere else."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import orjson

if TYPE_CHECKING:
    from app.campaigns import Campaign

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant will do; it only has to be the same for every worker.
_MIGRATION_LOCK = 0x68_6F_6E_67

CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""

INSERT_CAMPAIGN = """
INSERT INTO campaigns (id, kind, name, total_fen, count, min_fen, max_fen,
                       starts_at, ends_at, config)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
"""


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = re.match(r"^(\d+)_", path.name)
        if match is None:
            raise RuntimeError(f"migration file without a version prefix: {path.name}")
        found.append((int(match.group(1)), path.name, path.read_text(encoding="utf-8")))
    return found


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations in order, under an advisory lock; return the names applied."""
    applied: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(CREATE_VERSION_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied.append(name)
    return applied


def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


async def insert_campaign(
    pool: asyncpg.Pool, campaign: Campaign, amounts: list[int] | None
) -> None:
    """Record a campaign definition and (for red packets) its envelopes, in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            INSERT_CAMPAIGN,
            campaign.id,
            campaign.kind,
            campaign.name,
            campaign.total_fen,
            campaign.count,
            campaign.min_fen,
            campaign.max_fen,
            _ts(campaign.starts_at_ms),
            _ts(campaign.ends_at_ms),
            orjson.dumps(campaign.config).decode(),
        )
        if amounts:
            await conn.copy_records_to_table(
                "envelopes",
                records=((campaign.id, seq, amount) for seq, amount in enumerate(amounts)),
                columns=["campaign_id", "seq", "amount_fen"],
            )
