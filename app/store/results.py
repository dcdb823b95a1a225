"""PostgreSQL: what a campaign gave out, as everyone may see it (GET .../results).

One statement per answer, read from the ledger tables the drainers fill: a red packet's
best envelope, latest envelopes and totals; a lottery's prizes won per tier and latest
prize winners. Players appear under their WeChat nickname when one was kept at login
(``player_names``, snsapi_userinfo only), otherwise under a masked openid.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from app.model import from_datetime

# A red packet's grabs, read once: the best envelope (ties: the earliest grant, in
# stream order within one millisecond), the latest ones, and the totals. The winners'
# names are joined for the rows shown only.
SELECT_RED_PACKET = """
WITH g AS MATERIALIZED (
    SELECT openid, amount_fen, granted_at, stream_id FROM grabs WHERE campaign_id = $1
), best AS (
    SELECT 'best' AS part, 0::bigint AS rank, openid, amount_fen, granted_at FROM g
    ORDER BY amount_fen DESC, granted_at, length(stream_id), stream_id LIMIT 1
), latest AS (
    SELECT 'latest' AS part,
           row_number() OVER (ORDER BY granted_at DESC, length(stream_id) DESC,
                                       stream_id DESC) AS rank,
           openid, amount_fen, granted_at
    FROM g ORDER BY rank LIMIT $2
), shown AS (
    SELECT * FROM best UNION ALL SELECT * FROM latest
)
SELECT s.part, s.openid, n.nickname, s.amount_fen, s.granted_at,
       (SELECT count(*) FROM g) AS won_count,
       (SELECT coalesce(sum(amount_fen), 0) FROM g)::bigint AS won_fen
FROM shown s LEFT JOIN player_names n ON n.openid = s.openid
ORDER BY s.part, s.rank
"""

# A lottery's prizes: won per tier (the partial index draws_prizes holds exactly the
# prize rows), and the latest prize winners.
SELECT_LOTTERY = """
WITH p AS MATERIALIZED (
    SELECT openid, tier, drawn_at, stream_id FROM draws
    WHERE campaign_id = $1 AND tier IS NOT NULL
), latest AS (
    SELECT row_number() OVER (ORDER BY drawn_at DESC, length(stream_id) DESC,
                                       stream_id DESC) AS rank,
           openid, tier, drawn_at
    FROM p ORDER BY rank LIMIT $2
)
SELECT 'latest' AS part, l.rank, l.openid, n.nickname, l.tier, l.drawn_at, NULL::bigint AS won
FROM latest l LEFT JOIN player_names n ON n.openid = l.openid
UNION ALL
SELECT 'tier', tier, NULL, NULL, tier, NULL, count(*) FROM p GROUP BY tier
ORDER BY 1, 2
"""


UPSERT_NAME = """
INSERT INTO player_names (openid, nickname) VALUES ($1, $2)
ON CONFLICT (openid) DO UPDATE SET nickname = EXCLUDED.nickname, updated_at = now()
WHERE player_names.nickname IS DISTINCT FROM EXCLUDED.nickname
"""


async def remember_name(pg: asyncpg.Pool, openid: str, nickname: str) -> None:
    """Keep the player's latest WeChat nickname for the results."""
    await pg.execute(UPSERT_NAME, openid, nickname)


def public_name(openid: str, nickname: str | None = None) -> str:
    """How a player is shown to everyone: the WeChat nickname, else the openid masked
    (its first and last two characters around ``***``; short ones mostly hidden)."""
    if nickname:
        return nickname
    if len(openid) <= 4:
        return f"{openid[:1]}***"
    return f"{openid[:2]}***{openid[-2:]}"


@dataclass(frozen=True, slots=True)
class Winner:
    """One envelope as everyone sees it."""

    name: str
    amount_fen: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class PrizeWinner:
    """One prize won, as everyone sees it."""

    name: str
    tier: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class RedPacketTally:
    """A red packet's results as the ledger holds them."""

    best: Winner | None
    latest: list[Winner]
    won_count: int
    won_fen: int


@dataclass(frozen=True, slots=True)
class LotteryTally:
    """A lottery's prizes as the ledger holds them: won per tier, latest winners."""

    won: dict[int, int]
    latest: list[PrizeWinner]


def _name(row: asyncpg.Record) -> str:
    return public_name(row["openid"], row["nickname"])


async def red_packet(pg: asyncpg.Pool, campaign_id: str, limit: int) -> RedPacketTally:
    """The best envelope, the ``limit`` latest (latest first) and the totals."""
    rows = await pg.fetch(SELECT_RED_PACKET, campaign_id, limit)
    shown = {
        part: [
            Winner(_name(r), r["amount_fen"], from_datetime(r["granted_at"]))
            for r in rows
            if r["part"] == part
        ]
        for part in ("best", "latest")
    }
    won_count = rows[0]["won_count"] if rows else 0
    won_fen = rows[0]["won_fen"] if rows else 0
    best = shown["best"][0] if shown["best"] else None
    return RedPacketTally(best, shown["latest"], won_count, won_fen)


async def lottery(pg: asyncpg.Pool, campaign_id: str, limit: int) -> LotteryTally:
    """Prizes won per tier, and the ``limit`` latest prize winners (latest first)."""
    rows = await pg.fetch(SELECT_LOTTERY, campaign_id, limit)
    won = {r["tier"]: r["won"] for r in rows if r["part"] == "tier"}
    latest = [
        PrizeWinner(_name(r), r["tier"], from_datetime(r["drawn_at"]))
        for r in rows
        if r["part"] == "latest"
    ]
    return LotteryTally(won, latest)
