"""Throughput of the payout worker against the fake WeChat Pay (issue 15, docs/capacity.md).

Writes ``--bills`` grants of one new campaign into PostgreSQL (the outbox trigger makes
their bills), runs ``--processes`` payout processes at ``--rate`` creates per second, and
times NEW -> WAIT_USER_CONFIRM for all of them; the fake reports its busiest second.
Uses the given Redis and PostgreSQL (migrated, never wiped); bounded by ``--within``.

    .venv/bin/python -m bench.payout --redis-url redis://127.0.0.1:6379/13 \\
        --database-url postgresql://postgres@127.0.0.1:5432/bench --bills 2000 --rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg

from app.local.embedded import free_port
from app.local.fakewechatpay import provision
from app.store import ledger


async def seed(database_url: str, bills: int) -> str:
    """A campaign of ``bills`` envelopes, every one granted (so every one has a bill)."""
    cid = f"bench{secrets.token_hex(6)}"
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await ledger.migrate(pool)
        await pool.execute(
            "INSERT INTO campaigns (id, kind, name, total_fen, count)"
            " VALUES ($1, 'red_packet', 'payout bench', $2, $3)",
            cid,
            bills * 100,
            bills,
        )
        await pool.execute(
            "INSERT INTO envelopes SELECT $1, s, 100 FROM generate_series(0, $2 - 1) s",
            cid,
            bills,
        )
        await pool.execute(
            "INSERT INTO grabs (campaign_id, openid, seq, amount_fen, granted_at, stream_id)"
            " SELECT $1, 'bench-' || s, s, 100, now(), '0-' || s"
            " FROM generate_series(0, $2 - 1) s",
            cid,
            bills,
        )
    finally:
        await pool.close()
    return cid


async def left(database_url: str, cid: str) -> int:
    """Bills of the campaign not yet created at the fake."""
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM payouts WHERE campaign_id = $1 AND state = 'NEW'", cid
            )
        )
    finally:
        await conn.close()


def fake_ledger(port: int) -> dict[str, object]:
    """The fake's own account of what it was asked."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/fake/ledger", timeout=30) as resp:
        return dict(json.loads(resp.read()))


def main() -> int:
    """Run the measurement; print one JSON line."""
    parser = argparse.ArgumentParser(prog="bench.payout")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bills", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--within", type=float, default=120)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            **provision(
                Path(tmp), "wxbench000000001", f"http://127.0.0.1:{port}", "http://127.0.0.1:9/"
            ),
            "REDIS_URL": args.redis_url,
            "DATABASE_URL": args.database_url,
            "PAYOUT_RATE_PER_S": str(args.rate),
            "PAYOUT_BATCH_MAX": "100",
            "PAYOUT_POLL_S": "3600",
        }
        python = [sys.executable, "-m", "app"]
        fake = subprocess.Popen([*python, "fake-wechatpay", "--port", str(port)], env=env)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            time.sleep(1.5)
            cid = asyncio.run(seed(args.database_url, args.bills))
            start = time.monotonic()
            procs = [subprocess.Popen([*python, "payout"], env=env) for _ in range(args.processes)]
            while asyncio.run(left(args.database_url, cid)) > 0:
                if time.monotonic() - start > args.within:
                    print("not finished within the bound", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            seconds = time.monotonic() - start
            seen = fake_ledger(port)
        finally:
            for proc in [*procs, fake]:
                proc.send_signal(signal.SIGTERM)
            for proc in [*procs, fake]:
                proc.wait(timeout=30)
    result = {
        "bills": args.bills,
        "processes": args.processes,
        "rate_limit_per_s": args.rate,
        "seconds": round(seconds, 2),
        "bills_per_s": round(args.bills / seconds, 1),
        "fake_busiest_second": seen["busiest_second"],
        "fake_creates": seen["creates"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
