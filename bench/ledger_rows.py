"""PostgreSQL CPU per recorded grant, and what each part of the schema costs of it.

Run: ``python -m bench.ledger_rows [--rows 100000] [--rounds 2]``.

Starts its own PostgreSQL (embedded, on a free loopback port, in a temporary folder)
and, for each variant, builds the schema afresh (app.store.ledger.migrate), changes it
as the variant says, loads one campaign of ``--rows`` envelopes and records that many
grants the way the drainers do (app.store.ledger.write_grabs, batches of 500, one
transaction each). It reports the backend's CPU per grant (user + system, from
/proc/<pid>/stat) and the ratio to the full schema measured in the same run. Variants
alternate over ``--rounds`` and each figure is the median, so a busy moment of the
machine does not land on one variant only.

Variants: the schema as shipped; without the foreign key from grabs to envelopes (a
per-row check that locks the envelope's row); without the trigger that writes each
grant's payout row (the payout outbox); without both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import asyncpg

from app.local.embedded import EmbeddedPostgres, free_port
from app.records import GrabRecord
from app.store import ledger

BATCH = 500
CAMPAIGN = "bench-ledger"
NO_FK = "ALTER TABLE grabs DROP CONSTRAINT grabs_campaign_id_seq_fkey"
NO_OUTBOX = "DROP TRIGGER grabs_payouts ON grabs"
VARIANTS = {
    "as shipped": (),
    "no foreign key to envelopes": (NO_FK,),
    "no payout row (outbox trigger)": (NO_OUTBOX,),
    "neither": (NO_FK, NO_OUTBOX),
}
START_MS = 1_800_000_000_000


def backend_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one(url: str, changes: tuple[str, ...], rows: int) -> float:
    """Backend CPU µs per grant recorded, on a fresh schema changed by ``changes``."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await ledger.migrate(pool)
        grants = [
            GrabRecord(CAMPAIGN, f"{START_MS + i}-0", f"player-{i:08d}", i, 100, START_MS + i)
            for i in range(rows)
        ]
        async with pool.acquire() as conn:
            for change in changes:
                await conn.execute(change)
            await conn.execute(
                "INSERT INTO campaigns (id, kind, name, total_fen, count, min_fen, max_fen) "
                "VALUES ($1, 'red_packet', 'bench', $2, $3, 100, 100)",
                CAMPAIGN,
                rows * 100,
                rows,
            )
            await conn.copy_records_to_table(
                "envelopes",
                records=[(CAMPAIGN, seq, 100) for seq in range(rows)],
                columns=["campaign_id", "seq", "amount_fen"],
            )
            await conn.execute("CHECKPOINT")
            pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
            before = backend_cpu_s(pid)
            for start in range(0, rows, BATCH):
                async with conn.transaction():
                    await ledger.write_grabs(conn, grants[start : start + BATCH])
            return (backend_cpu_s(pid) - before) * 1e6 / rows
    finally:
        await pool.close()


async def run(rows: int, rounds: int) -> str:
    """Every variant, ``rounds`` times alternated; the markdown table."""
    with tempfile.TemporaryDirectory(prefix="hb-ledger-rows-") as tmp:
        server = EmbeddedPostgres(Path(tmp), free_port()).start()
        try:
            measured: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for _ in range(rounds):
                for name, changes in VARIANTS.items():
                    measured[name].append(await one(server.url, changes, rows))
        finally:
            server.stop()
    shipped = statistics.median(measured["as shipped"])
    lines = [
        f"{rows:,} grants recorded in batches of {BATCH}, {rounds} rounds (medians):",
        "",
        "| schema | backend CPU µs per grant | of the shipped schema's |",
        "|---|---:|---:|",
    ]
    for name, values in measured.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.1f} | {median / shipped:.2f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse the command line and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_rows")
    parser.add_argument("--rows", type=int, default=100_000, help="grants per variant")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the variants")
    args = parser.parse_args()
    print(asyncio.run(run(args.rows, args.rounds)))


if __name__ == "__main__":
    main()
