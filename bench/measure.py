"""One measured run: wrk against a URL, CPU per component, and Redis and ledger counters."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil
from redis.asyncio import Redis

from app.background.lag import ledger_lag
from app.store.scripts import CampaignKeys

PLAYERS_LUA = Path(__file__).resolve().parent / "wrk" / "players.lua"
WRK_ERRORS = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")


@dataclass
class Result:
    """One wrk run."""

    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    # CPU seconds per component during the run (the load generator included).
    cpu_s: dict[str, float] = field(default_factory=dict)


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by ``pids`` and all their children."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


def wrk(name: str, url: str, sessions: Path, seconds: int, connections: int, origin: str) -> Result:
    """Run wrk against ``url`` and parse the BENCH line of players.lua."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            *("wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"),
            *("-s", str(PLAYERS_LUA), url, "--", str(sessions), "POST", origin, "2"),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    line = next(li for li in out.splitlines() if li.startswith("BENCH "))
    data = json.loads(line[len("BENCH ") :])
    return Result(
        name=name,
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=sum(data[k] for k in WRK_ERRORS),
        requests=data["requests"],
        cpu_s={"wrk": wrk_cpu},
    )


async def catch_up(redis: Redis, timeout_s: float = 300) -> tuple[int, float]:
    """The ledger lag now, and how long the drainers take to bring it to zero."""
    lag = await ledger_lag(redis)
    start = time.monotonic()
    while await ledger_lag(redis):
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the ledger did not catch up within {timeout_s}s")
        await asyncio.sleep(0.05)
    return lag, time.monotonic() - start


async def won_count(redis: Redis, campaign_id: str) -> int:
    """Envelopes won in a red packet, as its meta hash counts them."""
    return int(await redis.hget(CampaignKeys.of(campaign_id).meta, "won_count") or 0)


async def ledger_matches(redis: Redis, database_url: str, campaign_ids: list[str]) -> bool:
    """Whether PostgreSQL holds exactly the grants Redis counted, campaign by campaign."""
    conn = await asyncpg.connect(database_url)
    try:
        for cid in campaign_ids:
            won = await redis.hmget(CampaignKeys.of(cid).meta, ["won_count", "won_fen"])
            count, fen = await conn.fetchrow(
                "SELECT count(*), coalesce(sum(amount_fen), 0) FROM grabs WHERE campaign_id = $1",
                cid,
            ) or (0, 0)
            if (int(won[0] or 0), int(won[1] or 0)) != (count, fen):
                return False
        return True
    finally:
        await conn.close()


async def script_calls(redis: Redis) -> int:
    """EVALSHA + EVAL calls so far."""
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))
