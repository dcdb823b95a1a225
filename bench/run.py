"""One-command benchmark of the real stack: ``./hb bench``.

Starts its own stack (bench/stack.py: Redis with AOF everysec, PostgreSQL, N app workers
and N floor workers (bench/floor.py), each set behind HAProxy from the production
``haproxy/haproxy.cfg``), mints player sessions, and drives each path with wrk
(bench/wrk/players.lua: every request a different player; bench/rounds.py). It prints
req/s, p50 and p99 for each path with its ratio to the floor measured in the same run,
Redis script calls per grab (INFO commandstats), and the cost of appendfsync always
(bench/report.py). Everything runs on loopback, bounded in time, and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys

from app.identity.sessions import SessionStore
from bench.campaigns import create_all
from bench.measure import ledger_matches
from bench.report import Setup, render
from bench.rounds import PATHS, Rounds
from bench.stack import DRAIN_NICE, Stack, running


async def mint_sessions(stack: Stack, players: int) -> list[str]:
    """Sessions of ``players`` players, written for wrk; their tokens in order."""
    openids = [f"bench-{i:07d}" for i in range(players)]
    tokens = await SessionStore(stack.redis, 3600).mint(openids)
    sessions = stack.work / "sessions.tsv"
    sessions.write_text("".join(f"{o}\t{t}\n" for o, t in zip(openids, tokens, strict=True)))
    return tokens


async def bench(args: argparse.Namespace) -> str:
    """Run every scenario; return the markdown report."""
    async with running(args.workers, args.drain) as stack:
        tokens = await mint_sessions(stack, args.players)
        campaigns = await create_all(stack.base, args.rounds, args.players, tokens[-1])
        rounds = Rounds(stack, stack.work / "sessions.tsv", args.seconds, args.connections)
        rounds.run("warm-up", stack.floor_url)
        for r in range(args.rounds):
            await rounds.one(r, set(args.paths), campaigns)
        ledger_ok = await ledger_matches(
            stack.redis, stack.database_url, [*campaigns.grab, *campaigns.always]
        )
    setup = Setup(
        workers=args.workers,
        connections=args.connections,
        seconds=args.seconds,
        rounds=args.rounds,
        players=args.players,
        drain=args.drain,
    )
    return render(setup, rounds.measured, ledger_ok)


def parser() -> argparse.ArgumentParser:
    """The command line of ``./hb bench``."""
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--players", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--drain",
        choices=("process", "worker"),
        default="process",
        help=f"ledger drainers: one process at nice {DRAIN_NICE} (default), or one per worker",
    )
    parser.add_argument(
        "--paths",
        type=lambda v: v.split(","),
        default=list(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)}",
    )
    return parser


def main() -> None:
    """Parse arguments, run, print the report."""
    cli = parser()
    args = cli.parse_args()
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        cli.error(f"unknown paths: {', '.join(sorted(unknown))}")
    if shutil.which("wrk") is None or shutil.which("haproxy") is None:
        sys.exit("bench needs wrk and haproxy: apt-get install -y wrk haproxy")
    print(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
