"""PostgreSQL: migrations and the durable records. Transactions open here and nowhere else."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import asyncpg.pool
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

# Draws arrive at least once from the ledger stream. One statement, as WRITE_GRABS: a draw
# already recorded exactly (a redelivery after a drainer died between COMMIT and XACK) is
# skipped; one that contradicts the recorded draw of that number (possible only after
# Redis lost acknowledged writes) is kept in ledger_rejects instead of being dropped.
WRITE_DRAWS = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::smallint[], $5::bigint[],
                         $6::date[], $7::timestamptz[], $8::text[])
        AS b (campaign_id, openid, draw_no, tier, value_fen, day, drawn_at, stream_id)
), inserted AS (
    INSERT INTO draws (campaign_id, openid, draw_no, tier, value_fen, day, drawn_at, stream_id)
    SELECT * FROM batch
    ON CONFLICT (campaign_id, openid, draw_no) DO NOTHING
    RETURNING *
), rejected AS (
    INSERT INTO ledger_rejects (campaign_id, stream_id, kind, fields, reason)
    SELECT b.campaign_id, b.stream_id, 'draw',
           jsonb_build_object('u', b.openid, 'n', b.draw_no, 'p', coalesce(b.tier, -1),
                              'a', b.value_fen, 't', b.drawn_at,
                              'd', to_char(b.day, 'YYYYMMDD')),
           'contradicts the recorded draw of the same player and number'
    FROM batch b
    WHERE NOT EXISTS (SELECT 1 FROM inserted i
                      WHERE i.campaign_id = b.campaign_id AND i.stream_id = b.stream_id)
      -- the statement's snapshot does not show its own inserts: look in both
      AND NOT EXISTS (SELECT 1 FROM (SELECT * FROM draws UNION ALL SELECT * FROM inserted) d
                      WHERE d.campaign_id = b.campaign_id AND d.openid = b.openid
                        AND d.draw_no = b.draw_no AND d.tier IS NOT DISTINCT FROM b.tier
                        AND d.value_fen = b.value_fen AND d.day = b.day
                        AND d.drawn_at = b.drawn_at)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM rejected) AS rejected
"""

SELECT_DRAWS = """
SELECT openid, draw_no, tier, value_fen, to_char(day, 'YYYYMMDD')::integer AS day, stream_id
FROM draws WHERE campaign_id = $1
"""

SELECT_DRAWS_OF = """
SELECT d.openid, d.draw_no, d.tier, d.value_fen, to_char(d.day, 'YYYYMMDD')::integer AS day,
       d.stream_id
FROM draws d
JOIN unnest($2::text[], $3::integer[]) AS w (openid, draw_no)
  ON d.openid = w.openid AND d.draw_no = w.draw_no
WHERE d.campaign_id = $1
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


async def insert_draws(conn: Conn, records: Sequence[DrawRecord]) -> Written:
    """Write drained draws in one statement: new ones inserted, exact replays skipped,
    contradictions of a recorded draw kept as rejects."""
    if not records:
        return Written()
    row = await conn.fetchrow(
        WRITE_DRAWS,
        [r.campaign_id for r in records],
        [r.openid for r in records],
        [r.draw_no for r in records],
        [r.tier for r in records],
        [r.value_fen for r in records],
        [r.day for r in records],
        [r.drawn_at for r in records],
        [r.stream_id for r in records],
    )
    assert row is not None
    return Written(int(row["inserted"]), int(row["rejected"]))


@dataclass(frozen=True, slots=True)
class SettledDraw:
    """One lottery draw as the ledger (a ``draws`` row or a stream entry) holds it."""

    tier: int | None
    value_fen: int
    day: int  # YYYYMMDD, Asia/Shanghai
    stream_id: str


async def fetch_draws(
    pool: asyncpg.Pool, campaign_id: str, wanted: Sequence[tuple[str, int]] | None = None
) -> dict[tuple[str, int], SettledDraw]:
    """(openid, draw_no) -> the recorded draw: all of a campaign's, or only ``wanted``."""
    if wanted is None:
        rows = await pool.fetch(SELECT_DRAWS, campaign_id)
    else:
        rows = await pool.fetch(
            SELECT_DRAWS_OF, campaign_id, [u for u, _ in wanted], [n for _, n in wanted]
        )
    return {
        (r["openid"], r["draw_no"]): SettledDraw(
            r["tier"], r["value_fen"], r["day"], r["stream_id"]
        )
        for r in rows
    }


# --- The write-behind ledger: stream entries recorded by the drainers -------------------

# One statement, so one round trip and atomic without an explicit transaction. A grant
# already recorded (the same player, envelope and amount: a redelivery after a drainer
# died between COMMIT and XACK) is skipped; a grant that contradicts a recorded one is
# kept in ledger_rejects instead of being dropped.
WRITE_GRABS = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::bigint[],
                         $6::timestamptz[])
        AS b (campaign_id, stream_id, openid, seq, amount_fen, granted_at)
), inserted AS (
    INSERT INTO grabs (campaign_id, openid, seq, amount_fen, granted_at, stream_id)
    SELECT campaign_id, openid, seq, amount_fen, granted_at, stream_id FROM batch
    ON CONFLICT DO NOTHING
    RETURNING campaign_id, stream_id
), rejected AS (
    INSERT INTO ledger_rejects (campaign_id, stream_id, kind, fields, reason)
    SELECT b.campaign_id, b.stream_id, 'grab',
           jsonb_build_object('u', b.openid, 's', b.seq, 'a', b.amount_fen,
                              't', b.granted_at),
           'contradicts a recorded grab of the same player or envelope'
    FROM batch b
    WHERE NOT EXISTS (SELECT 1 FROM inserted i
                      WHERE i.campaign_id = b.campaign_id AND i.stream_id = b.stream_id)
      AND NOT EXISTS (SELECT 1 FROM grabs g
                      WHERE g.campaign_id = b.campaign_id AND g.openid = b.openid
                        AND g.seq = b.seq AND g.amount_fen = b.amount_fen)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM rejected) AS rejected
"""

INSERT_REJECTS = """
INSERT INTO ledger_rejects (campaign_id, stream_id, kind, fields, reason)
SELECT campaign_id, stream_id, kind, fields::jsonb, reason
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
    AS r (campaign_id, stream_id, kind, fields, reason)
ON CONFLICT DO NOTHING
"""

SELECT_CAMPAIGN = "SELECT * FROM campaigns WHERE id = $1"
SELECT_ENVELOPES = "SELECT seq, amount_fen FROM envelopes WHERE campaign_id = $1 ORDER BY seq"
SELECT_UNGRANTED = """
SELECT e.seq, e.amount_fen FROM envelopes e
WHERE e.campaign_id = $1
  AND NOT EXISTS (SELECT 1 FROM grabs g WHERE g.campaign_id = e.campaign_id AND g.seq = e.seq)
ORDER BY e.seq
"""
SELECT_GRABS = "SELECT openid, seq, amount_fen FROM grabs WHERE campaign_id = $1"
SELECT_GRABS_OF = """
SELECT openid, seq, amount_fen FROM grabs WHERE campaign_id = $1 AND openid = ANY($2::text[])
"""
SELECT_REJECTS = """
SELECT stream_id, kind, fields::text AS fields, reason FROM ledger_rejects
WHERE campaign_id = $1 ORDER BY stream_id
"""

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One entry of a campaign's ledger stream: a settled event to record."""

    campaign_id: str
    stream_id: str
    fields: dict[str, str]

    @property
    def kind(self) -> str:
        """The record kind: field ``k``; entries without it are grabs."""
        return self.fields.get("k", GRAB)


@dataclass(frozen=True, slots=True)
class Written:
    """What recording a batch did: rows inserted and entries kept as rejects."""

    inserted: int = 0
    rejected: int = 0

    def __add__(self, other: Written) -> Written:
        return Written(self.inserted + other.inserted, self.rejected + other.rejected)


class MalformedEntry(ValueError):
    """A stream entry lacks a field or has one that does not parse."""


GRAB = "grab"
DRAW = "draw"
# Records the entries of one kind in ONE statement (atomic on its own) and says what it did.
KindWriter = Callable[[Conn, list[LedgerEntry]], Awaitable[Written]]


def _grab_row(entry: LedgerEntry) -> tuple[str, int, int, datetime]:
    f = entry.fields
    try:
        openid, seq, amount, ms = f["u"], int(f["s"]), int(f["a"]), int(f["t"])
    except (KeyError, ValueError) as exc:
        raise MalformedEntry(f"grab entry {entry.stream_id}: {exc!r}") from None
    if not openid or seq < 0 or amount <= 0:
        raise MalformedEntry(f"grab entry {entry.stream_id}: out of range")
    return (
        openid,
        seq,
        amount,
        datetime.fromtimestamp(ms // 1000, tz=UTC).replace(microsecond=ms % 1000 * 1000),
    )


async def write_grabs(conn: Conn, entries: list[LedgerEntry]) -> Written:
    """Record grab entries (fields u, s, a, t); malformed ones become rejects."""
    good: list[tuple[LedgerEntry, tuple[str, int, int, datetime]]] = []
    bad: list[tuple[LedgerEntry, str]] = []
    for entry in entries:
        try:
            good.append((entry, _grab_row(entry)))
        except MalformedEntry as exc:
            bad.append((entry, str(exc)))
    written = Written()
    if good:
        row = await conn.fetchrow(
            WRITE_GRABS,
            [e.campaign_id for e, _ in good],
            [e.stream_id for e, _ in good],
            [r[0] for _, r in good],
            [r[1] for _, r in good],
            [r[2] for _, r in good],
            [r[3] for _, r in good],
        )
        assert row is not None
        written = Written(int(row["inserted"]), int(row["rejected"]))
    if bad:
        written += await insert_rejects(conn, bad)
    return written


async def write_draws(conn: Conn, entries: list[LedgerEntry]) -> Written:
    """Record lottery draw entries (``k=draw``); malformed ones become rejects."""
    good: list[DrawRecord] = []
    bad: list[tuple[LedgerEntry, str]] = []
    for entry in entries:
        try:
            good.append(DrawRecord.from_entry(entry.campaign_id, entry.stream_id, entry.fields))
        except (KeyError, ValueError) as exc:
            bad.append((entry, f"draw entry {entry.stream_id}: {exc!r}"))
    if not bad:
        return await insert_draws(conn, good)
    # Two statements: keep them atomic (a savepoint when the caller has a transaction).
    async with conn.transaction():
        return await insert_draws(conn, good) + await insert_rejects(conn, bad)


async def insert_rejects(conn: Conn, rejects: list[tuple[LedgerEntry, str]]) -> Written:
    """Keep entries that cannot be recorded as they are, with the reason."""
    await conn.execute(
        INSERT_REJECTS,
        [e.campaign_id for e, _ in rejects],
        [e.stream_id for e, _ in rejects],
        [e.kind for e, _ in rejects],
        [orjson.dumps(e.fields).decode() for e, _ in rejects],
        [reason for _, reason in rejects],
    )
    return Written(0, len(rejects))


async def record(
    pool: asyncpg.Pool,
    work: list[tuple[KindWriter, list[LedgerEntry]]],
    rejects: list[tuple[LedgerEntry, str]],
) -> Written:
    """Record a drained batch atomically: one statement, or one transaction for several."""
    async with pool.acquire() as conn:
        if len(work) == 1 and not rejects:
            writer, entries = work[0]
            return await writer(conn, entries)
        written = Written()
        async with conn.transaction():
            for writer, entries in work:
                written += await writer(conn, entries)
            if rejects:
                written += await insert_rejects(conn, rejects)
        return written


async def fetch_campaign(pool: asyncpg.Pool, campaign_id: str) -> asyncpg.Record | None:
    """The campaign row, or None."""
    return await pool.fetchrow(SELECT_CAMPAIGN, campaign_id)


async def fetch_envelopes(pool: asyncpg.Pool, campaign_id: str) -> list[tuple[int, int]]:
    """Every ``(seq, amount_fen)`` of a campaign, by seq."""
    return [(r["seq"], r["amount_fen"]) for r in await pool.fetch(SELECT_ENVELOPES, campaign_id)]


async def fetch_ungranted(pool: asyncpg.Pool, campaign_id: str) -> list[tuple[int, int]]:
    """The ``(seq, amount_fen)`` of envelopes no recorded grab took, by seq."""
    return [(r["seq"], r["amount_fen"]) for r in await pool.fetch(SELECT_UNGRANTED, campaign_id)]


async def fetch_grabs(
    pool: asyncpg.Pool, campaign_id: str, openids: list[str] | None = None
) -> dict[str, tuple[int, int]]:
    """openid -> (seq, amount_fen) of recorded grabs (all, or of ``openids`` only)."""
    if openids is None:
        rows = await pool.fetch(SELECT_GRABS, campaign_id)
    else:
        rows = await pool.fetch(SELECT_GRABS_OF, campaign_id, openids)
    return {r["openid"]: (r["seq"], r["amount_fen"]) for r in rows}


async def fetch_rejects(pool: asyncpg.Pool, campaign_id: str) -> list[asyncpg.Record]:
    """Entries of a campaign the drainers kept aside, oldest first."""
    return await pool.fetch(SELECT_REJECTS, campaign_id)
