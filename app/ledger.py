"""PostgreSQL: migrations and the durable records. Transactions open here and nowhere else."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
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

# Draws arrive at least once from the ledger stream; the primary key makes a replay a no-op.
INSERT_DRAWS = """
INSERT INTO draws (campaign_id, openid, draw_no, tier, value_fen, day, drawn_at, stream_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::smallint[], $5::bigint[],
                     $6::date[], $7::timestamptz[], $8::text[])
ON CONFLICT (campaign_id, openid, draw_no) DO NOTHING
"""

DRAW_PRIZES_PER_TIER = """
SELECT tier, count(*) AS won FROM draws
WHERE campaign_id = $1 AND tier IS NOT NULL GROUP BY tier
"""

DRAWS_PER_PLAYER = """
SELECT openid, count(*) AS draws, max(draw_no) AS last_draw_no FROM draws
WHERE campaign_id = $1 GROUP BY openid
"""

DRAWS_PER_PLAYER_DAY = """
SELECT openid, day, count(*) AS draws FROM draws WHERE campaign_id = $1 GROUP BY openid, day
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


@dataclass(frozen=True, slots=True)
class DrawRecord:
    """One lottery draw as the ledger stream carries it (``k=draw``)."""

    campaign_id: str
    openid: str
    draw_no: int
    tier: int | None
    value_fen: int
    day: date
    drawn_at: datetime
    stream_id: str

    @classmethod
    def from_entry(cls, campaign_id: str, stream_id: str, fields: Mapping[str, str]) -> DrawRecord:
        """Parse a decoded stream entry: u openid, n draw number, p tier or -1, a fen, t ms,
        d YYYYMMDD. Raises KeyError or ValueError when the entry is malformed."""
        tier = int(fields["p"])
        day = int(fields["d"])
        ms = int(fields["t"])
        return cls(
            campaign_id=campaign_id,
            openid=fields["u"],
            draw_no=int(fields["n"]),
            tier=None if tier < 0 else tier,
            value_fen=int(fields["a"]),
            day=date(day // 10_000, day // 100 % 100, day % 100),
            drawn_at=datetime.fromtimestamp(ms // 1000, tz=UTC) + timedelta(milliseconds=ms % 1000),
            stream_id=stream_id,
        )


async def insert_draws(conn: asyncpg.Connection, records: Sequence[DrawRecord]) -> int:
    """Write drained draws (idempotent on replay); return how many rows were new."""
    if not records:
        return 0
    status = await conn.execute(
        INSERT_DRAWS,
        [r.campaign_id for r in records],
        [r.openid for r in records],
        [r.draw_no for r in records],
        [r.tier for r in records],
        [r.value_fen for r in records],
        [r.day for r in records],
        [r.drawn_at for r in records],
        [r.stream_id for r in records],
    )
    return int(status.rsplit(" ", 1)[1])


@dataclass(frozen=True, slots=True)
class DrawTotals:
    """What the ledger holds of one lottery, for reconciliation against Redis."""

    prizes_per_tier: dict[int, int]
    # openid -> (rows, highest draw number): equal when no draw is missing.
    draws_per_player: dict[str, tuple[int, int]]
    draws_per_player_day: dict[tuple[int, str], int]


async def draw_totals(conn: asyncpg.Connection, campaign_id: str) -> DrawTotals:
    """Prizes per tier, draws per player and per (day YYYYMMDD, player), in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        tiers = await conn.fetch(DRAW_PRIZES_PER_TIER, campaign_id)
        players = await conn.fetch(DRAWS_PER_PLAYER, campaign_id)
        days = await conn.fetch(DRAWS_PER_PLAYER_DAY, campaign_id)
    return DrawTotals(
        prizes_per_tier={r["tier"]: r["won"] for r in tiers},
        draws_per_player={r["openid"]: (r["draws"], r["last_draw_no"]) for r in players},
        draws_per_player_day={
            (int(r["day"].strftime("%Y%m%d")), r["openid"]): r["draws"] for r in days
        },
    )
