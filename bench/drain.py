"""How fast one drainer copies grants into PostgreSQL, against a floor: ``./hb bench-drain``.

Creates a red packet of ``--count`` envelopes and settles that many grabs through the grab
script, so the campaign's ledger stream holds ``count`` entries. Then, in the same run:

* drainer: one in-process ``Drainer`` steps until the stream is empty (XREADGROUP,
  one INSERT ... SELECT FROM unnest per batch, XACK + XDEL), and the ledger is checked
  against the Redis winners;
* baseline: the very rows it wrote are deleted (and the table vacuumed), then written
  again straight into ``grabs`` by one ``COPY`` (asyncpg copy_records_to_table) in one
  transaction: no Redis, no batching, no conflict checks; what PostgreSQL itself takes.

It prints entries/s of both and their ratio. Nothing is asserted; speed is measured here,
never in tests. With REDIS_URL and DATABASE_URL set it uses those stores (throw-away ones:
it writes a campaign into them); unset, it starts its own Redis and PostgreSQL (app.local.embedded)
on free ports and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import asyncpg
import uvloop
from redis.asyncio import Redis

from app.background.drainer import Drainer
from app.campaigns.service import CampaignService
from app.local.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from app.records import Envelope
from app.settings import LedgerSettings
from app.store import ledger
from app.store.scripts import CampaignKeys, Scripts

GRAB_COLUMNS = ["campaign_id", "openid", "seq", "amount_fen", "granted_at", "stream_id"]
SELECT_ROWS = f"SELECT {', '.join(GRAB_COLUMNS)} FROM grabs WHERE campaign_id = $1"
SETTLE_BATCH = 128


@contextmanager
def stores() -> Iterator[tuple[str, str]]:
    """(redis_url, database_url): from the environment, or embedded servers started here."""
    redis_url, database_url = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    work = Path(tempfile.mkdtemp(prefix="hongbao-bench-drain-"))
    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    try:
        if not redis_url:
            redis_srv = EmbeddedRedis(work / "redis", free_port()).start()
            started.append(redis_srv)
            redis_url = redis_srv.url
        if not database_url:
            pg_srv = EmbeddedPostgres(work / "pg", free_port()).start()
            started.append(pg_srv)
            database_url = pg_srv.url
        yield redis_url, database_url
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def rate(rows: int, seconds: float) -> str:
    """``rows`` in ``seconds`` as a line fragment."""
    return f"{rows:,} rows in {seconds:.2f}s = {rows / seconds:,.0f} entries/s"


async def settle(redis: Redis, pool: asyncpg.Pool, count: int) -> str:
    """A red packet of ``count`` envelopes, every one granted: its ledger stream holds
    ``count`` entries. Returns its id."""
    scripts = Scripts(redis)
    service = CampaignService(redis, pool, scripts, batch_max=SETTLE_BATCH)
    campaign = await service.create(
        {"kind": "red_packet", "name": "bench", "total_fen": count * 100, "count": count}
    )
    users = [f"bench-{i:08d}" for i in range(count)]
    for start in range(0, count, SETTLE_BATCH):
        await scripts.grab_envelope(campaign.id, users[start : start + SETTLE_BATCH])
    queued = await redis.xlen(CampaignKeys.of(campaign.id).ledger)
    if queued != count:
        raise RuntimeError(f"expected {count} stream entries, found {queued}")
    return campaign.id


async def drain(
    redis: Redis, pool: asyncpg.Pool, cid: str, batch_max: int
) -> tuple[Drainer, float]:
    """Step one drainer until the stream is empty; it and the seconds it took."""
    stream = CampaignKeys.of(cid).ledger
    settings = LedgerSettings(drain_in_worker=False, batch_max=batch_max, block_ms=50)
    drainer = Drainer(redis, pool, settings, "bench")
    t0 = time.perf_counter()
    while await redis.xlen(stream) > 0:
        await drainer.step()
    return drainer, time.perf_counter() - t0


async def checked_rows(
    redis: Redis, pool: asyncpg.Pool, cid: str, count: int
) -> list[tuple[Any, ...]]:
    """The grabs rows of ``cid``, once they are shown to equal the Redis winners."""
    rows = [tuple(r) for r in await pool.fetch(SELECT_ROWS, cid)]
    winners = cast(dict[bytes, bytes], await redis.hgetall(CampaignKeys.of(cid).winners))
    recorded = {r[1]: Envelope(r[2], r[3]) for r in rows}
    in_redis = {u.decode(): Envelope.decode(v) for u, v in winners.items()}
    if in_redis != recorded or len(rows) != count:
        raise RuntimeError("the ledger does not equal the Redis winners")
    return rows


async def baseline(pool: asyncpg.Pool, cid: str, rows: list[tuple[Any, ...]]) -> float:
    """Delete ``rows`` and write them again by one COPY; the seconds the COPY took."""
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM grabs WHERE campaign_id = $1", cid)
        await conn.execute("VACUUM ANALYZE grabs")
        t0 = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table("grabs", records=rows, columns=GRAB_COLUMNS)
        copied_s = time.perf_counter() - t0
    if await pool.fetchval("SELECT count(*) FROM grabs WHERE campaign_id = $1", cid) != len(rows):
        raise RuntimeError("the baseline COPY did not write every row")
    return copied_s


async def bench(redis_url: str, database_url: str, count: int, batch_max: int) -> None:
    """Settle ``count`` grabs, drain them, then COPY the same rows; print both and the ratio."""
    redis = Redis.from_url(redis_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await ledger.migrate(pool)
        cid = await settle(redis, pool, count)
        drainer, drained_s = await drain(redis, pool, cid, batch_max)
        copied_s = await baseline(pool, cid, await checked_rows(redis, pool, cid, count))
    finally:
        await pool.close()
        await redis.aclose()

    print(f"{count:,} grants of one campaign; one drainer, LEDGER_BATCH_MAX={batch_max}")
    print(f"baseline  one COPY into grabs, no Redis:            {rate(count, copied_s)}")
    print(f"drainer   XREADGROUP, INSERT unnest, XACK+XDEL:     {rate(count, drained_s)}")
    print(f"  ({drainer.written})")
    print(f"ratio drainer / baseline: {copied_s / drained_s:.2f}")


def parser() -> argparse.ArgumentParser:
    """The command line of ``./hb bench-drain``."""
    parser = argparse.ArgumentParser(prog="bench-drain")
    parser.add_argument(
        "--count", type=int, default=100_000, help="grants to drain (default 100,000)"
    )
    parser.add_argument(
        "--batch-max", type=int, default=500, help="the drainer's LEDGER_BATCH_MAX (default 500)"
    )
    return parser


def main() -> None:
    """Parse arguments, get the stores, run."""
    args = parser().parse_args()
    with (
        stores() as (redis_url, database_url),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        runner.run(bench(redis_url, database_url, args.count, args.batch_max))


if __name__ == "__main__":
    main()
