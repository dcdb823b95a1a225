"""How fast one drainer copies grants into PostgreSQL (outside pytest; never asserted).

    REDIS_URL=... DATABASE_URL=... .venv/bin/python loadtest/drain_bench.py --count 100000

Creates a red packet of ``count`` envelopes, settles ``count`` grabs straight through
the grab script (so the stream holds ``count`` entries), then times one in-process
drainer until the stream is empty, and checks the ledger equals the winners.
Use throw-away stores: it writes a campaign into them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import asyncpg
import uvloop
from redis.asyncio import Redis

from app import ledger
from app.campaigns import CampaignService, now_ms
from app.drainer import Drainer
from app.scripts import CampaignKeys, Scripts
from app.settings import LedgerSettings


async def bench(count: int, batch_max: int) -> None:
    redis = Redis.from_url(os.environ["REDIS_URL"])
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=2)
    await ledger.migrate(pool)
    scripts = Scripts(redis)
    service = CampaignService(redis, pool, scripts, grab_batch_max=128)
    campaign = await service.create(
        {"kind": "red_packet", "name": "bench", "total_fen": count * 100, "count": count}
    )
    users = [f"bench-{i:08d}" for i in range(count)]
    t0 = time.perf_counter()
    for start in range(0, count, 128):
        await scripts.grab_envelope(campaign.id, users[start : start + 128], now_ms())
    settled = time.perf_counter() - t0
    stream = CampaignKeys.of(campaign.id).ledger
    print(f"settled {count} grabs in {settled:.2f}s; stream length {await redis.xlen(stream)}")

    settings = LedgerSettings(drain_in_worker=False, batch_max=batch_max, block_ms=50)
    drainer = Drainer(redis, pool, settings, "bench")
    t0 = time.perf_counter()
    while await redis.xlen(stream) > 0:
        await drainer.step()
    took = time.perf_counter() - t0
    rows = await pool.fetchval("SELECT count(*) FROM grabs WHERE campaign_id = $1", campaign.id)
    print(
        f"drained {rows} entries in {took:.2f}s with batch_max={batch_max}: "
        f"{rows / took:,.0f} entries/s ({drainer.written})"
    )
    await pool.close()
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--batch-max", type=int, default=500)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(bench(args.count, args.batch_max))


if __name__ == "__main__":
    main()
