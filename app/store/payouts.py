"""PostgreSQL: the payout outbox (table ``payouts``, rows written by triggers on the grants)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

# WeChat's bill states, and ours before a bill exists at WeChat.
NEW = "NEW"
FINAL = ("SUCCESS", "FAIL", "CANCELLED")
STATES = (
    "NEW",
    "ACCEPTED",
    "PROCESSING",
    "WAIT_USER_CONFIRM",
    "TRANSFERING",
    "SUCCESS",
    "FAIL",
    "CANCELING",
    "CANCELLED",
)
MAX_RETRIES = 99

_COLUMNS = """out_bill_no, base_bill_no, campaign_id, openid, grant_kind, grant_no, amount_fen,
state, sent, transfer_bill_no, package_info, fail_reason, attempts, retry_no, previous_bills,
waiting_since, queue_no, created_at"""

# Bills that are due, leased to one worker: SKIP LOCKED keeps two workers off one bill
# while the lease is taken; the lease keeps them off it while the call to WeChat runs.
LEASE_DUE = f"""
UPDATE payouts p SET lease_until = now() + make_interval(secs => $2), updated_at = now()
FROM (SELECT out_bill_no FROM payouts
      WHERE state NOT IN ('SUCCESS', 'FAIL', 'CANCELLED') AND next_at <= now()
        AND (lease_until IS NULL OR lease_until < now())
      ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
WHERE p.out_bill_no = due.out_bill_no
RETURNING {", ".join("p." + c.strip() for c in _COLUMNS.split(","))}
"""

# Only forward (payout_rank), and only for this bill number: a worker whose lease
# ran out, a late answer or a replayed notification never undoes a newer state.
ADVANCE = """
UPDATE payouts SET
    state = $2,
    transfer_bill_no = coalesce($3, transfer_bill_no),
    package_info = coalesce($4, package_info),
    fail_reason = coalesce($5, fail_reason),
    waiting_since = CASE WHEN $2 = 'WAIT_USER_CONFIRM' THEN coalesce(waiting_since, now())
                         ELSE waiting_since END,
    updated_at = now()
WHERE out_bill_no = $1 AND state NOT IN ('SUCCESS', 'FAIL', 'CANCELLED')
  AND payout_rank($2) >= payout_rank(state)
RETURNING state
"""

RESCHEDULE = """
UPDATE payouts SET next_at = now() + make_interval(secs => $2), lease_until = NULL,
    attempts = attempts + $3, sent = sent OR $4, updated_at = now()
WHERE out_bill_no = $1
"""

MARK_SENT = "UPDATE payouts SET sent = true, updated_at = now() WHERE out_bill_no = $1"

SELECT_PLAYER = f"""
SELECT {_COLUMNS} FROM payouts WHERE campaign_id = $1 AND openid = $2
ORDER BY grant_kind, grant_no
"""

SELECT_CAMPAIGN = f"SELECT {_COLUMNS} FROM payouts WHERE campaign_id = $1 ORDER BY out_bill_no"

SELECT_ONE = f"SELECT {_COLUMNS} FROM payouts WHERE out_bill_no = $1"

# From the head of the queue, not a count of the rows ahead: one index probe, however
# long the queue (bills ahead already made out of turn are still counted).
# The same way, the queue's length: two probes of the partial index, never a count.
BACKLOG = """
SELECT coalesce(max(queue_no) - min(queue_no) + 1, 0) FROM payouts WHERE state = 'NEW'
"""
QUEUE_POSITION = """
SELECT $1 - coalesce(min(queue_no), $1) FROM payouts WHERE state = 'NEW'
"""

TOTALS = """
SELECT state, count(*) AS count, coalesce(sum(amount_fen), 0)::bigint AS fen
FROM payouts WHERE campaign_id = $1 GROUP BY state
"""

RETRY = """
UPDATE payouts SET
    previous_bills = previous_bills || out_bill_no,
    retry_no = retry_no + 1,
    out_bill_no = base_bill_no || 'R' || (retry_no + 1)::text,
    state = 'NEW', sent = false, transfer_bill_no = NULL, package_info = NULL,
    fail_reason = NULL, attempts = 0, waiting_since = NULL, next_at = now(),
    lease_until = NULL, updated_at = now()
WHERE campaign_id = $1 AND state IN ('FAIL', 'CANCELLED') AND retry_no < $2
RETURNING out_bill_no
"""

# Every cash grant of a campaign beside its payout row (NULL columns where one is missing).
GRANTS_AND_PAYOUTS = """
WITH grants AS (
    SELECT campaign_id, 'grab' AS kind, openid, seq AS grant_no, amount_fen
    FROM grabs WHERE campaign_id = $1
    UNION ALL
    SELECT campaign_id, 'draw', openid, draw_no, value_fen
    FROM draws WHERE campaign_id = $1 AND value_fen > 0
)
SELECT g.kind AS g_kind, g.openid AS g_openid, g.grant_no AS g_no, g.amount_fen AS g_fen,
       p.grant_kind, p.openid, p.grant_no, p.amount_fen, p.out_bill_no
FROM grants g
FULL JOIN (SELECT * FROM payouts WHERE campaign_id = $1) p
  ON p.grant_kind = g.kind AND p.openid = g.openid AND p.grant_no = g.grant_no
"""


@dataclass(frozen=True, slots=True)
class Bill:
    """One payout row: the transfer bill paying one grant."""

    out_bill_no: str
    base_bill_no: str
    campaign_id: str
    openid: str
    grant_kind: str
    grant_no: int
    amount_fen: int
    state: str
    sent: bool
    transfer_bill_no: str | None
    package_info: str | None
    fail_reason: str | None
    attempts: int
    retry_no: int
    previous_bills: tuple[str, ...]
    waiting_since: datetime | None
    queue_no: int
    created_at: datetime

    @classmethod
    def of(cls, row: asyncpg.Record) -> Bill:
        """The bill of a row selected with every column."""
        return cls(**{**dict(row), "previous_bills": tuple(row["previous_bills"])})

    @property
    def final(self) -> bool:
        """SUCCESS, FAIL or CANCELLED: nothing more will happen to this bill."""
        return self.state in FINAL


async def lease_due(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[Bill]:
    """Up to ``limit`` due bills, leased for ``lease_s`` to the caller."""
    return [Bill.of(r) for r in await pool.fetch(LEASE_DUE, limit, float(lease_s))]


async def advance(
    pool: asyncpg.Pool,
    out_bill_no: str,
    state: str,
    *,
    transfer_bill_no: str | None = None,
    package_info: str | None = None,
    fail_reason: str | None = None,
) -> bool:
    """Move a bill forward to ``state`` (or refresh a state in flight); False when the
    bill is final or past it."""
    row = await pool.fetchrow(
        ADVANCE, out_bill_no, state, transfer_bill_no, package_info, fail_reason
    )
    return row is not None


async def mark_sent(pool: asyncpg.Pool, out_bill_no: str) -> None:
    """Record, before the request leaves, that a create request may reach WeChat."""
    await pool.execute(MARK_SENT, out_bill_no)


async def reschedule(
    pool: asyncpg.Pool, out_bill_no: str, after_s: float, *, failed: bool = False
) -> None:
    """Release the lease; the bill is due again in ``after_s`` (``failed``: one more
    attempt counted)."""
    await pool.execute(RESCHEDULE, out_bill_no, float(after_s), int(failed), False)


async def player_bills(pool: asyncpg.Pool, campaign_id: str, openid: str) -> list[Bill]:
    """A player's bills in a campaign."""
    return [Bill.of(r) for r in await pool.fetch(SELECT_PLAYER, campaign_id, openid)]


async def campaign_bills(pool: asyncpg.Pool, campaign_id: str) -> list[Bill]:
    """Every bill of a campaign."""
    return [Bill.of(r) for r in await pool.fetch(SELECT_CAMPAIGN, campaign_id)]


async def bill(pool: asyncpg.Pool, out_bill_no: str) -> Bill | None:
    """One bill by number, or None."""
    row = await pool.fetchrow(SELECT_ONE, out_bill_no)
    return None if row is None else Bill.of(row)


async def queue_position(pool: asyncpg.Pool, bill: Bill) -> int:
    """About how many bills not yet created at WeChat Pay are ahead of ``bill``."""
    return int(await pool.fetchval(QUEUE_POSITION, bill.queue_no))


async def backlog(pool: asyncpg.Pool) -> int:
    """About how many bills wait to be created at WeChat Pay, all campaigns together."""
    return int(await pool.fetchval(BACKLOG))


async def totals(pool: asyncpg.Pool, campaign_id: str) -> dict[str, tuple[int, int]]:
    """state -> (count, fen) of a campaign's bills."""
    return {r["state"]: (r["count"], r["fen"]) for r in await pool.fetch(TOTALS, campaign_id)}


async def retry_failed(pool: asyncpg.Pool, campaign_id: str) -> list[str]:
    """Give every FAIL or CANCELLED bill of a campaign a new attempt; the new numbers."""
    return [r["out_bill_no"] for r in await pool.fetch(RETRY, campaign_id, MAX_RETRIES)]


async def grants_and_payouts(pool: asyncpg.Pool, campaign_id: str) -> Sequence[asyncpg.Record]:
    """Every cash grant of a campaign joined to its payout row (reconcile)."""
    return await pool.fetch(GRANTS_AND_PAYOUTS, campaign_id)
