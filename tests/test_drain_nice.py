"""LEDGER_DRAIN_NICE: a drainer process that yields the CPU still records every grant."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from app.settings import Settings
from app.web.factory import create_app
from tests.conftest import PAGE, create_campaign, login
from tests.test_ledger import MANUAL, grab, grabs_of, wait_drained, winners_of
from tests.test_ledger_chaos import DrainerProcs


def niceness(pid: int) -> int:
    """The CPU niceness of process ``pid``."""
    return os.getpriority(os.PRIO_PROCESS, pid)


async def test_a_niced_drainer_records_every_grant(
    aiohttp_client: Any,
    settings: Settings,
    redis: Redis,
    pg: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    client = await aiohttp_client(create_app(settings.with_(ledger=MANUAL)), headers=PAGE)
    campaign = await create_campaign(client, total_fen=50_000, count=100)
    cid = str(campaign["id"])
    tokens = await asyncio.gather(*(login(client, f"n{i:03d}") for i in range(120)))
    client.session.cookie_jar.clear()
    results = await asyncio.gather(*(grab(client, t, cid) for t in tokens))
    assert sum(r["result"] == "won" for r in results) == 100

    procs = DrainerProcs(settings, tmp_path)
    procs.env["LEDGER_DRAIN_NICE"] = "19"
    drainer = procs.start()
    try:
        await wait_drained(redis, cid)
        winners = await winners_of(redis, cid)
        assert len(winners) == 100
        assert await grabs_of(pg, cid) == winners
        # os.nice adds to the niceness it inherits, up to 19.
        assert niceness(drainer.pid) == min(niceness(os.getpid()) + 19, 19)
    finally:
        procs.reap()
