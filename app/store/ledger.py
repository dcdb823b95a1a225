"""PostgreSQL: migrations and the durable records. Transactions open here and nowhere else."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import asyncpg.pool
import orjson

from app.model import Campaign, day_date, from_datetime, optional_datetime, to_datetime
from app.records import (
    CloseoutRecord,
    DrawRecord,
    Envelope,
    GrabRecord,
    LedgerEntry,
    MalformedRecord,
    PauseRecord,
    TierLeftover,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant will do; it only has to be the same for every worker.
_MIGRATION_LOCK = 0x68_6F_6E_67
# A creation's COPY reports its progress every this many envelopes.
COPY_PROGRESS_ROWS = 50_000

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

# Draws arrive at least once from the ledger stream, and two drainers may hold the same
# entry (one claimed it while the other was still writing). Two statements, as for grabs:
# the INSERT skips a draw already recorded, waiting for a concurrent writer's transaction
# to end if it holds the row; the reject check then runs in its own statement, whose fresh
# snapshot sees that writer's commit, so only a true contradiction of the recorded draw of
# that number (possible only after Redis lost acknowledged writes) becomes a reject.
INSERT_DRAWS = """
INSERT INTO draws (campaign_id, openid, draw_no, tier, value_fen, day, drawn_at, stream_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::smallint[], $5::bigint[],
                     $6::date[], $7::timestamptz[], $8::text[])
ON CONFLICT (campaign_id, openid, draw_no) DO NOTHING
RETURNING campaign_id, stream_id
"""

REJECT_DRAWS = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::smallint[], $5::bigint[],
                         $6::date[], $7::timestamptz[], $8::text[])
        AS b (campaign_id, openid, draw_no, tier, value_fen, day, drawn_at, stream_id)
), rejected AS (
    INSERT INTO ledger_rejects (campaign_id, stream_id, kind, fields, reason)
    SELECT b.campaign_id, b.stream_id, 'draw',
           jsonb_build_object('u', b.openid, 'n', b.draw_no, 'p', coalesce(b.tier, -1),
                              'a', b.value_fen, 't', b.drawn_at,
                              'd', to_char(b.day, 'YYYYMMDD')),
           'contradicts the recorded draw of the same player and number'
    FROM batch b
    WHERE NOT EXISTS (SELECT 1 FROM draws d
                      WHERE d.campaign_id = b.campaign_id AND d.openid = b.openid
                        AND d.draw_no = b.draw_no AND d.tier IS NOT DISTINCT FROM b.tier
                        AND d.value_fen = b.value_fen AND d.day = b.day
                        AND d.drawn_at = b.drawn_at)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) AS rejected FROM rejected
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


async def insert_campaign(
    pool: asyncpg.Pool,
    campaign: Campaign[Any],
    *,
    columns: Mapping[str, int | None] | None = None,
    config: Mapping[str, Any] | None = None,
    amounts: Sequence[int] = (),
    commit_after: Awaitable[object] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Record a campaign definition (``columns``: a red packet's budget, ``config``: a
    lottery's definition) and its envelopes, in one transaction; with ``commit_after``
    (work running beside, such as the Redis load), commit only once it has succeeded.
    ``progress(done, total)`` follows the envelopes as COPY sends them."""
    budget = columns or {}

    def records() -> Iterator[tuple[str, int, int]]:
        for seq, amount in enumerate(amounts):
            if progress is not None and seq % COPY_PROGRESS_ROWS == 0:
                progress(seq, len(amounts))
            yield campaign.id, seq, amount
        if progress is not None:
            progress(len(amounts), len(amounts))

    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            INSERT_CAMPAIGN,
            campaign.id,
            str(campaign.kind),
            campaign.name,
            budget.get("total_fen"),
            budget.get("count"),
            budget.get("min_fen"),
            budget.get("max_fen"),
            optional_datetime(campaign.starts_at_ms),
            optional_datetime(campaign.ends_at_ms),
            orjson.dumps(config or {}).decode(),
        )
        if amounts:
            await conn.copy_records_to_table(
                "envelopes",
                records=records(),
                columns=["campaign_id", "seq", "amount_fen"],
            )
        if commit_after is not None:
            # Its failure raises here, inside the transaction, which then rolls back.
            await commit_after


async def discard_campaign(pool: asyncpg.Pool, campaign_id: str) -> None:
    """Delete a campaign whose creation failed, with its envelopes (nothing if absent)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM envelopes WHERE campaign_id = $1", campaign_id)
        await conn.execute("DELETE FROM campaigns WHERE id = $1", campaign_id)


async def write_draws(conn: Conn, records: Sequence[DrawRecord]) -> Written:
    """Write drained draws: new ones inserted, exact replays skipped, contradictions of a
    recorded draw kept as rejects (a second statement, only when something was skipped)."""
    if not records:
        return Written()

    def columns(batch: Sequence[DrawRecord]) -> list[list[Any]]:
        return [
            [r.campaign_id for r in batch],
            [r.openid for r in batch],
            [r.draw_no for r in batch],
            [r.tier for r in batch],
            [r.value_fen for r in batch],
            [day_date(r.day) for r in batch],
            [to_datetime(r.at_ms) for r in batch],
            [r.stream_id for r in batch],
        ]

    rows = await conn.fetch(INSERT_DRAWS, *columns(records))
    inserted = {(r["campaign_id"], r["stream_id"]) for r in rows}
    skipped = [r for r in records if (r.campaign_id, r.stream_id) not in inserted]
    if not skipped:
        return Written(len(inserted))
    rejected = await conn.fetchval(REJECT_DRAWS, *columns(skipped))
    return Written(len(inserted), int(rejected))


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

# Grants arrive at least once, and two drainers may hold the same entry: a drainer
# claims entries another has read but not yet acknowledged once they are idle for
# LEDGER_CLAIM_IDLE_MS, and under a PostgreSQL stall the first may still be writing them.
# So two statements. The INSERT skips a grant already recorded; when the row is held by
# a concurrent writer's open transaction it waits for that transaction to end. The reject
# check then runs as a statement of its own: in READ COMMITTED its snapshot is taken
# after the INSERT returned, so it sees the concurrent commit, and only a grant that truly
# contradicts a recorded one (another envelope or amount for the player, or another
# player on the envelope) is kept in ledger_rejects instead of being dropped. The common
# case, every entry new, is the INSERT alone: one round trip. Both statements are
# idempotent, so a drainer that dies between them leaves nothing a retry cannot finish.
INSERT_GRABS = """
INSERT INTO grabs (campaign_id, stream_id, openid, seq, amount_fen, granted_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::bigint[],
                     $6::timestamptz[])
ON CONFLICT DO NOTHING
RETURNING campaign_id, stream_id
"""

REJECT_GRABS = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::bigint[],
                         $6::timestamptz[])
        AS b (campaign_id, stream_id, openid, seq, amount_fen, granted_at)
), rejected AS (
    INSERT INTO ledger_rejects (campaign_id, stream_id, kind, fields, reason)
    SELECT b.campaign_id, b.stream_id, 'grab',
           jsonb_build_object('u', b.openid, 's', b.seq, 'a', b.amount_fen,
                              't', b.granted_at),
           'contradicts a recorded grab of the same player or envelope'
    FROM batch b
    WHERE NOT EXISTS (SELECT 1 FROM grabs g
                      WHERE g.campaign_id = b.campaign_id AND g.openid = b.openid
                        AND g.seq = b.seq AND g.amount_fen = b.amount_fen)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) AS rejected FROM rejected
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
class Written:
    """What recording a batch did: rows inserted and entries kept as rejects."""

    inserted: int = 0
    rejected: int = 0

    def __add__(self, other: Written) -> Written:
        return Written(self.inserted + other.inserted, self.rejected + other.rejected)


async def write_grabs(conn: Conn, records: Sequence[GrabRecord]) -> Written:
    """Record grants: new ones inserted, exact replays skipped, contradictions of a
    recorded grant kept as rejects (a second statement, only when something was skipped)."""
    if not records:
        return Written()

    def columns(batch: Sequence[GrabRecord]) -> list[list[Any]]:
        return [
            [r.campaign_id for r in batch],
            [r.stream_id for r in batch],
            [r.openid for r in batch],
            [r.seq for r in batch],
            [r.amount_fen for r in batch],
            [to_datetime(r.at_ms) for r in batch],
        ]

    rows = await conn.fetch(INSERT_GRABS, *columns(records))
    inserted = {(r["campaign_id"], r["stream_id"]) for r in rows}
    skipped = [r for r in records if (r.campaign_id, r.stream_id) not in inserted]
    if not skipped:
        return Written(len(inserted))
    rejected = await conn.fetchval(REJECT_GRABS, *columns(skipped))
    return Written(len(inserted), int(rejected))


async def insert_rejects(conn: Conn, rejects: Sequence[tuple[LedgerEntry, str]]) -> Written:
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


async def record(pool: asyncpg.Pool, entries: Sequence[LedgerEntry]) -> Written:
    """Record a drained batch of any kinds: each entry decoded and written by its kind,
    malformed ones kept as rejects; several kinds or rejects in one transaction."""
    grabs: list[GrabRecord] = []
    draws: list[DrawRecord] = []
    changes: list[PauseRecord | CloseoutRecord] = []
    bad: list[tuple[LedgerEntry, str]] = []
    for entry in entries:
        try:
            decoded = entry.decode()
        except MalformedRecord as exc:
            bad.append((entry, str(exc)))
            continue
        if isinstance(decoded, GrabRecord):
            grabs.append(decoded)
        elif isinstance(decoded, DrawRecord):
            draws.append(decoded)
        else:
            changes.append(decoded)
    async with pool.acquire() as conn:
        if not bad and not changes and not (grabs and draws):
            return await (write_grabs(conn, grabs) if grabs else write_draws(conn, draws))
        async with conn.transaction():
            written = await write_grabs(conn, grabs) + await write_draws(conn, draws)
            written += await write_lifecycle(conn, changes)
            if bad:
                written += await insert_rejects(conn, bad)
            return written


async def reject(pool: asyncpg.Pool, entry: LedgerEntry, reason: str) -> Written:
    """Keep one entry PostgreSQL refuses as a reject."""
    async with pool.acquire() as conn:
        return await insert_rejects(conn, [(entry, reason)])


async def fetch_campaign(pool: asyncpg.Pool, campaign_id: str) -> asyncpg.Record | None:
    """The campaign row, or None."""
    return await pool.fetchrow(SELECT_CAMPAIGN, campaign_id)


async def fetch_envelopes(pool: asyncpg.Pool, campaign_id: str) -> list[Envelope]:
    """Every envelope of a campaign, by seq."""
    rows = await pool.fetch(SELECT_ENVELOPES, campaign_id)
    return [Envelope(r["seq"], r["amount_fen"]) for r in rows]


async def fetch_ungranted(pool: asyncpg.Pool, campaign_id: str) -> list[Envelope]:
    """The envelopes no recorded grab took, by seq."""
    rows = await pool.fetch(SELECT_UNGRANTED, campaign_id)
    return [Envelope(r["seq"], r["amount_fen"]) for r in rows]


async def fetch_grabs(
    pool: asyncpg.Pool, campaign_id: str, openids: list[str] | None = None
) -> dict[str, Envelope]:
    """openid -> envelope of recorded grabs (all, or of ``openids`` only)."""
    if openids is None:
        rows = await pool.fetch(SELECT_GRABS, campaign_id)
    else:
        rows = await pool.fetch(SELECT_GRABS_OF, campaign_id, openids)
    return {r["openid"]: Envelope(r["seq"], r["amount_fen"]) for r in rows}


async def fetch_rejects(pool: asyncpg.Pool, campaign_id: str) -> list[asyncpg.Record]:
    """Entries of a campaign the drainers kept aside, oldest first."""
    return await pool.fetch(SELECT_REJECTS, campaign_id)


# --- A campaign's lifecycle: pauses and its close-out, recorded from the stream -----------

# Pauses and resumes apply in stream order: an entry delivered late (claimed after a
# stall) never overwrites a newer one; stream ids compare as (ms, seq) numbers.
UPDATE_PAUSED = """
UPDATE campaigns SET paused = $2, paused_entry = $3
WHERE id = $1
  AND (paused_entry IS NULL
       OR string_to_array(paused_entry, '-')::bigint[] < string_to_array($3, '-')::bigint[])
"""
INSERT_CLOSEOUT = """
INSERT INTO closeouts (campaign_id, refunded_count, refunded_fen, tiers, ended_at, closed_at,
                       stream_id, shard)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8)
ON CONFLICT (campaign_id, shard) DO NOTHING
"""
SET_ENDED = "UPDATE campaigns SET ended_at = $2 WHERE id = $1 AND ended_at IS NULL"
SELECT_CLOSEOUT = "SELECT * FROM closeouts WHERE campaign_id = $1 AND shard = $2"
SELECT_CLOSEOUTS = "SELECT * FROM closeouts WHERE campaign_id = $1 ORDER BY shard"
REJECT_CLOSEOUT = """
INSERT INTO ledger_rejects (campaign_id, stream_id, kind, fields, reason)
VALUES ($1, $2, 'closeout', $3::jsonb, 'contradicts the recorded close-out of the campaign')
ON CONFLICT DO NOTHING
"""


def _tiers_json(tiers: Sequence[TierLeftover] | None) -> str | None:
    if tiers is None:
        return None
    return orjson.dumps([{"unreleased": t.unreleased, "unwon": t.unwon} for t in tiers]).decode()


async def write_lifecycle(conn: Conn, records: Sequence[PauseRecord | CloseoutRecord]) -> Written:
    """Record pauses (the newest by stream order wins) and close-outs (one per campaign:
    a replay is skipped, a different one kept as a reject), in stream order."""
    written = Written()
    for r in records:
        if isinstance(r, PauseRecord):
            status = await conn.execute(UPDATE_PAUSED, r.campaign_id, r.paused, r.stream_id)
            written += Written(int(status.split()[-1]))
            continue
        tiers = _tiers_json(r.tiers)
        status = await conn.execute(
            INSERT_CLOSEOUT,
            r.campaign_id,
            r.refunded_count,
            r.refunded_fen,
            tiers,
            to_datetime(r.ended_ms),
            to_datetime(r.at_ms),
            r.stream_id,
            r.shard,
        )
        if status.split()[-1] == "1":
            await conn.execute(SET_ENDED, r.campaign_id, to_datetime(r.ended_ms))
            written += Written(1)
            continue
        kept = await conn.fetchrow(SELECT_CLOSEOUT, r.campaign_id, r.shard)
        if kept is not None and kept["stream_id"] != r.stream_id:
            fields = {"c": r.refunded_count, "a": r.refunded_fen, "r": tiers, "e": r.ended_ms}
            await conn.execute(
                REJECT_CLOSEOUT, r.campaign_id, r.stream_id, orjson.dumps(fields).decode()
            )
            written += Written(0, 1)
    return written


@dataclass(frozen=True, slots=True)
class Closeout:
    """A campaign's close-out as PostgreSQL records it."""

    refunded_count: int
    refunded_fen: int
    tiers: tuple[TierLeftover, ...] | None
    ended_ms: int
    closed_ms: int
    stream_id: str


async def fetch_paused(pool: asyncpg.Pool, campaign_id: str) -> bool:
    """Whether the campaign's last recorded pause was not resumed."""
    return bool(await pool.fetchval("SELECT paused FROM campaigns WHERE id = $1", campaign_id))


async def fetch_closeout(pool: asyncpg.Pool, campaign_id: str, shard: int = 0) -> Closeout | None:
    """The recorded close-out of a campaign (of its sub-pool ``shard``), or None."""
    row = await pool.fetchrow(SELECT_CLOSEOUT, campaign_id, shard)
    return None if row is None else _closeout(row)


async def fetch_closeouts(pool: asyncpg.Pool, campaign_id: str) -> dict[int, Closeout]:
    """The recorded close-outs of a sharded red packet's sub-pools, by shard."""
    return {row["shard"]: _closeout(row) for row in await pool.fetch(SELECT_CLOSEOUTS, campaign_id)}


def _closeout(row: asyncpg.Record) -> Closeout:
    tiers = None
    if row["tiers"] is not None:
        tiers = tuple(TierLeftover(t["unreleased"], t["unwon"]) for t in orjson.loads(row["tiers"]))
    return Closeout(
        row["refunded_count"],
        row["refunded_fen"],
        tiers,
        from_datetime(row["ended_at"]),
        from_datetime(row["closed_at"]),
        row["stream_id"],
    )
