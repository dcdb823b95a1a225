"""PostgreSQL CPU per recorded grant, and what each part of the schema costs of it.

Run: ``python -m bench.ledger_rows [--rows 100000] [--rounds 2]``.

Starts its own PostgreSQL (embedded, on a free loopback port, in a temporary folder)
and, for each variant, creates a database of its own, builds the schema there
(app.store.ledger.migrate), changes it as the variant says, loads one campaign of
``--rows`` envelopes, checkpoints (as in production, where a campaign's envelopes were
loaded before the last checkpoint, so the first lock on each envelope page writes a
full-page image) and records that many grants the way the drainers do
(app.store.ledger.write_grabs, batches of 500, one transaction each). It reports the
backend's CPU per grant (its scheduler's nanoseconds, /proc/<pid>/schedstat) and the
ratio to the shipped schema's measured in the same run. Only the backend is counted,
not the WAL writer, checkpointer or autovacuum. The variants rotate over ``--rounds``
(each round starts with the next one) and each figure is the median, so a busy moment
of the machine does not land on one variant only.

Variants: the schema as shipped; without the foreign key from grabs to envelopes (a
per-row check that locks the envelope's row); without the trigger that writes each
grant's payout row (the payout outbox); without both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import asyncpg

from app.local.embedded import EmbeddedPostgres, free_port
from app.records import GrabRecord
from app.store import ledger

BATCH = 500
CAMPAIGN = "bench-ledger"
DATABASE = "ledger_rows"
NO_FK = "ALTER TABLE grabs DROP CONSTRAINT grabs_campaign_id_seq_fkey"
NO_OUTBOX = "DROP TRIGGER grabs_payouts ON grabs"
VARIANTS = {
    "as shipped": (),
    "no foreign key to envelopes": (NO_FK,),
    "no payout row (outbox trigger)": (NO_OUTBOX,),
    "neither": (NO_FK, NO_OUTBOX),
}
START_MS = 1_800_000_000_000


def cpu_ns(pid: int) -> int:
    """Nanoseconds process ``pid`` has run so far (not clock ticks: a small run of
    ``--rows`` is still measured to the microsecond)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


async def one(server: EmbeddedPostgres, changes: tuple[str, ...], rows: int) -> float:
    """Backend CPU µs per grant recorded, on a fresh database changed by ``changes``."""
    admin = await asyncpg.connect(server.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    url = f"postgresql://postgres@127.0.0.1:{server.port}/{DATABASE}"
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
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
            before = cpu_ns(pid)
            for start in range(0, rows, BATCH):
                async with conn.transaction():
                    await ledger.write_grabs(conn, grants[start : start + BATCH])
            return (cpu_ns(pid) - before) / 1000 / rows
    finally:
        await pool.close()


async def ensure_own(server: EmbeddedPostgres) -> None:
    """Fail unless ``server.url`` reaches the server started in ``server.data_dir``
    (another one could have taken the free port first): only its databases are dropped."""
    conn = await asyncpg.connect(server.url)
    try:
        data_dir = Path(await conn.fetchval("SELECT current_setting('data_directory')"))
    finally:
        await conn.close()
    if not data_dir.resolve().is_relative_to(server.data_dir.resolve()):
        raise RuntimeError(f"{server.url} is not the bench's PostgreSQL ({data_dir})")


async def run(rows: int, rounds: int) -> str:
    """Every variant, ``rounds`` times, the order rotating; the markdown table."""
    names = list(VARIANTS)
    measured: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="hb-ledger-rows-") as tmp:
        server = EmbeddedPostgres(Path(tmp), free_port())
        try:
            server.start()
            await ensure_own(server)
            for round_no in range(rounds):
                for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
                    measured[name].append(await one(server, VARIANTS[name], rows))
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
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant")
    args = parser.parse_args()
    print(asyncio.run(run(args.rows, args.rounds)))


if __name__ == "__main__":
    main()
