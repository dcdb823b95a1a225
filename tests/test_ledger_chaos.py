"""The ledger under failure, with real processes: SIGKILLed drainers, PostgreSQL down for 20 s."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.background.drainer import GROUP
from app.local.embedded import EmbeddedPostgres, free_port
from app.settings import LedgerSettings, Settings
from app.store.scripts import CampaignKeys
from app.web.factory import create_app
from tests.conftest import ADMIN, PAGE, create_campaign, login
from tests.test_ledger import MANUAL, grab, grabs_of, wait_drained, winners_of

pytestmark = pytest.mark.slow

# Sessions of this database waiting for a lock (a drainer stuck in its INSERT).
BLOCKED_BACKENDS = """
SELECT array_agg(pid) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
"""


class Grabber:
    """Players grabbing in small bursts until stopped (bounded by ``limit`` players)."""

    def __init__(self, client: TestClient, cid: str, prefix: str, limit: int) -> None:
        self.client, self.cid, self.prefix, self.limit = client, cid, prefix, limit
        self.results: list[dict[str, Any]] = []
        self.stopped = asyncio.Event()

    async def run(self, burst: int = 10, pause_s: float = 0.02) -> None:
        """Log in and grab, ``burst`` players at a time, until stopped or out of players."""
        n = 0
        while not self.stopped.is_set() and n < self.limit:
            batch = [f"{self.prefix}{i:05d}" for i in range(n, min(n + burst, self.limit))]
            n += len(batch)
            tokens = await asyncio.gather(*(login(self.client, u) for u in batch))
            self.client.session.cookie_jar.clear()
            self.results += await asyncio.gather(*(grab(self.client, t, self.cid) for t in tokens))
            await asyncio.sleep(pause_s)

    def won(self) -> int:
        """How many grabs were told they won."""
        return sum(r["result"] == "won" for r in self.results)


class DrainerProcs:
    """`python -m app drain` processes started by a test, always reaped by it."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.env = {
            **os.environ,
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "LEDGER_BATCH_MAX": "50",
            "LEDGER_BLOCK_MS": "100",
            "LEDGER_CLAIM_IDLE_MS": "1000",
            "LEDGER_RETRY_MAX_MS": "300",
        }
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        """Start one drainer process."""
        log = open(self.log_dir / f"drainer-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "drain"], env=self.env, stdout=log, stderr=log
        )
        log.close()
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        """SIGKILL whatever is still running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def drainers(settings: Settings, tmp_path: Path) -> Iterator[DrainerProcs]:
    """A factory of drainer processes, killed at teardown."""
    procs = DrainerProcs(settings, tmp_path)
    yield procs
    procs.reap()


async def pending_of(redis: Redis, stream: str, consumer: str) -> int:
    """Entries delivered to ``consumer`` and not acknowledged (0 before the group exists)."""
    try:
        consumers = await redis.xinfo_consumers(stream, GROUP)
    except ResponseError:
        return 0
    for info in consumers:
        if info["name"].decode() == consumer:
            return int(info["pending"])
    return 0


async def wait_for(predicate: Any, within_s: float, what: str) -> None:
    """Poll an async predicate until true (bounded)."""
    deadline = time.monotonic() + within_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_sigkilled_drainers_lose_and_duplicate_nothing(
    aiohttp_client: Any,
    settings: Settings,
    redis: Redis,
    pg: asyncpg.Connection,
    drainers: DrainerProcs,
) -> None:
    client = await aiohttp_client(create_app(settings.with_(ledger=MANUAL)), headers=PAGE)
    campaign = await create_campaign(client, total_fen=300_000, count=3000)
    cid = str(campaign["id"])
    stream = CampaignKeys.of(cid).ledger
    grabber = Grabber(client, cid, "k", limit=2500)
    grabbing = asyncio.create_task(grabber.run())
    hostname = os.uname().nodename

    async def kill_mid_batch(*, write_dies_too: bool) -> None:
        # The grabs table is locked, so the drainer has read a batch and sits in its
        # INSERT when SIGKILL arrives. Either its PostgreSQL session dies with it (the
        # write is lost: the entries must be claimed and written again), or the session
        # lives on and commits once the lock goes (the redelivery must be a no-op).
        proc = drainers.start()
        consumer = f"{hostname}-{proc.pid}"
        async with pg.transaction():
            await pg.execute("LOCK TABLE grabs IN SHARE ROW EXCLUSIVE MODE")

            async def stuck() -> bool:
                # pg_stat_activity is a per-transaction snapshot unless cleared.
                await pg.execute("SELECT pg_stat_clear_snapshot()")
                return await pending_of(redis, stream, consumer) > 0 and bool(
                    await pg.fetchval(BLOCKED_BACKENDS)
                )

            await wait_for(stuck, 30, "the drainer to hold a batch")
            proc.kill()
            proc.wait(timeout=10)
            if write_dies_too:
                await pg.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)",
                    await pg.fetchval(BLOCKED_BACKENDS),
                )
        assert await pending_of(redis, stream, consumer) > 0

    await kill_mid_batch(write_dies_too=True)
    await kill_mid_batch(write_dies_too=False)

    # Kills 2..4 at random moments while grabs continue.
    rng = random.Random(7)
    for _ in range(3):
        proc = drainers.start()
        await asyncio.sleep(rng.uniform(0.8, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    grabber.stopped.set()
    await asyncio.wait_for(grabbing, 120)
    assert grabber.won() > 0
    assert all(r["result"] == "won" for r in grabber.results)

    # Recovery: one drainer claims what the dead ones left pending and drains the rest.
    survivor = drainers.start()

    async def settled() -> bool:
        return (
            await redis.xlen(stream) == 0 and (await redis.xpending(stream, GROUP))["pending"] == 0
        )

    survivor_log = drainers.log_dir / f"drainer-{len(drainers.procs) - 1}.log"

    async def survivor_started() -> bool:
        # It logs "started" once its SIGTERM handler is installed; before that, the
        # ledger may already be drained (by the killed ones) and SIGTERM would kill it.
        return b" started" in survivor_log.read_bytes()

    await wait_for(settled, 90, "the ledger to drain")
    await wait_for(survivor_started, 30, "the survivor to start")
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(timeout=30) == 0

    winners = await winners_of(redis, cid)
    assert len(winners) == grabber.won()
    assert await grabs_of(pg, cid) == winners
    assert await pg.fetchval("SELECT count(*) FROM grabs WHERE campaign_id = $1", cid) == len(
        winners
    )
    assert await pg.fetchval("SELECT count(*) FROM ledger_rejects") == 0


async def test_postgres_outage_grabs_continue_and_ledger_catches_up(
    aiohttp_client: Any, settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", free_port()).start()
    try:
        ledger_settings = LedgerSettings(block_ms=100, claim_idle_ms=5000, retry_max_ms=500)
        app_settings = settings.with_(database_url=server.url, ledger=ledger_settings)
        client = await aiohttp_client(create_app(app_settings), headers=PAGE)
        campaign = await create_campaign(client, total_fen=100_000, count=1000)
        cid = str(campaign["id"])
        warmup = Grabber(client, cid, "w", limit=100)
        await warmup.run()
        await wait_drained(redis, cid)

        server.stop()
        outage = Grabber(client, cid, "o", limit=1000)
        grabbing = asyncio.create_task(outage.run(burst=5, pause_s=0.25))
        await asyncio.sleep(20)
        outage.stopped.set()
        await asyncio.wait_for(grabbing, 60)
        assert Counter(r["result"] for r in outage.results) == {"won": len(outage.results)}
        assert len(outage.results) >= 20
        stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
        # Nothing could be recorded: every grant of the outage is still lag.
        assert stats["ledger_lag"] == len(outage.results)

        server.start()
        await wait_drained(redis, cid, within_s=60)
        conn = await asyncpg.connect(server.url)
        try:
            recorded = await grabs_of(conn, cid)
            rejects = await conn.fetchval("SELECT count(*) FROM ledger_rejects")
        finally:
            await conn.close()
        winners = await winners_of(redis, cid)
        assert len(winners) == 100 + len(outage.results)
        assert recorded == winners
        assert rejects == 0
    finally:
        server.stop()
