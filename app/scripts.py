"""Lua scripts (one file per atomic operation in lua/) and the Redis key schema.

Key schema -- every key of one campaign shares the hash tag ``{<campaign id>}`` so
each script touches a single Redis Cluster slot:

    hb:{<cid>}:meta      hash   definition (kind, name, window, totals) + won counters
    hb:{<cid>}:pool      list   un-granted envelopes, "seq:amount_fen", popped from the left
    hb:{<cid>}:winners   hash   openid -> "seq:amount_fen"
    hb:{<cid>}:ledger    stream one entry per grant, drained into PostgreSQL
    hb:campaigns         set    ids of every campaign (read by drainers and operators)
    hb:sess:<token>      string session JSON, with a TTL

Python builds key names here and nowhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"

CAMPAIGNS_SET = "hb:campaigns"


@dataclass(frozen=True, slots=True)
class CampaignKeys:
    """The Redis keys of one campaign."""

    meta: str
    pool: str
    winners: str
    ledger: str

    @classmethod
    def of(cls, campaign_id: str) -> CampaignKeys:
        """Key names for ``campaign_id``; all share its hash tag."""
        tag = f"hb:{{{campaign_id}}}"
        return cls(
            meta=f"{tag}:meta",
            pool=f"{tag}:pool",
            winners=f"{tag}:winners",
            ledger=f"{tag}:ledger",
        )


def session_key(token: str) -> str:
    """Redis key of a session token."""
    return f"hb:sess:{token}"


class GrabStatus(enum.IntEnum):
    """Campaign-level outcome of one grab_envelope call."""

    SETTLED = 0
    NOT_FOUND = 1
    NOT_STARTED = 2
    ENDED = 3


class GrabCode(enum.IntEnum):
    """Per-user outcome inside a settled batch."""

    WON = 0
    ALREADY_WON = 1
    SOLD_OUT = 2


@dataclass(frozen=True, slots=True)
class GrabBatchResult:
    """What grab_envelope answered for one batch."""

    status: GrabStatus
    remaining_count: int
    outcomes: list[tuple[GrabCode, int]]


def load_lua(name: str) -> str:
    """Source of ``lua/<name>.lua``."""
    return (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """Registered scripts with one typed method each.

    redis-py's AsyncScript runs EVALSHA and reloads the script once on NOSCRIPT
    (after a failover or SCRIPT FLUSH).
    """

    def __init__(self, redis: Redis) -> None:
        self._grab = redis.register_script(load_lua("grab_envelope"))

    async def preload(self, redis: Redis) -> None:
        """SCRIPT LOAD every script, so a syntax error stops start-up."""
        for script in self._all():
            await redis.script_load(script.script)

    async def ensure_loaded(self, redis: Redis) -> int:
        """Load any script Redis lost (restart, failover, SCRIPT FLUSH); return how many."""
        scripts = self._all()
        present = await redis.script_exists(*(script.sha for script in scripts))
        missing = [s for s, there in zip(scripts, present, strict=True) if not there]
        for script in missing:
            await redis.script_load(script.script)
        return len(missing)

    def _all(self) -> list[AsyncScript]:
        return [self._grab]

    async def grab_envelope(
        self, campaign_id: str, users: list[str], now_ms: int
    ) -> GrabBatchResult:
        """Settle grabs of ``users`` (distinct or not) on one campaign atomically."""
        k = CampaignKeys.of(campaign_id)
        raw = cast(
            list[Any],
            await self._grab(keys=[k.meta, k.pool, k.winners, k.ledger], args=[now_ms, *users]),
        )
        status = GrabStatus(int(raw[0]))
        outcomes = [(GrabCode(int(raw[i])), int(raw[i + 1])) for i in range(2, len(raw), 2)]
        return GrabBatchResult(status, int(raw[1]), outcomes)
