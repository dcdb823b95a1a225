"""One-command benchmark of the real stack: ``./hb bench``.

Starts its own stack (bench/stack.py: Redis with AOF everysec, PostgreSQL, N app workers
and N floor workers (bench/floor.py), each set behind HAProxy from the production
``haproxy/haproxy.cfg``), mints player sessions, and drives each path with wrk
(bench/wrk/players.lua: every request a different player; bench/rounds.py). Right after
each grab run, the same players grab through the OpenResty comparison (bench/openresty.py:
nginx + ngx_lua against the same Redis). It prints req/s, p50 and p99 for each path with
its ratio to the floor measured in the same run, our grab path against OpenResty's, Redis
script calls per grab (INFO commandstats), and the cost of appendfsync always
(bench/report.py). Everything runs on loopback, bounded in time, and is stopped at the end.
``./hb bench --redis-cluster N`` measures the settlement path on a local Redis Cluster
instead (bench/cluster.py).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys

from app.identity.sessions import SessionStore
from bench import cluster, openresty
from bench.campaigns import create_all
from bench.measure import ledger_matches
from bench.report import Setup, render
from bench.rounds import AFTER_GRAB, PATHS, Rounds
from bench.stack import DRAIN_NICE, Stack, running

# What --quick stands for, and the defaults of a full run.
QUICK = {"seconds": 2, "rounds": 1, "players": 100_000}
FULL = {"seconds": 5, "rounds": 3, "players": 200_000}
OPENRESTY_SESSIONS = "sessions-openresty.tsv"


async def mint_sessions(stack: Stack, players: int) -> list[str]:
    """Sessions of ``players`` players, written for wrk (and, with the OpenResty
    comparison, the same players with its cookies); their tokens in order."""
    openids = [f"bench-{i:07d}" for i in range(players)]
    tokens = await SessionStore(stack.redis, 3600).mint(openids)
    sessions = stack.work / "sessions.tsv"
    sessions.write_text("".join(f"{o}\t{t}\n" for o, t in zip(openids, tokens, strict=True)))
    if stack.openresty is not None:
        openresty.write_sessions(stack.work / OPENRESTY_SESSIONS, stack.cookie_key, openids)
    return tokens


async def bench(args: argparse.Namespace) -> str:
    """Run every scenario; return the markdown report."""
    async with running(args.workers, args.drain, "openresty" in args.paths) as stack:
        tokens = await mint_sessions(stack, args.players)
        campaigns = await create_all(stack.base, stack.redis, args.rounds, args.players, tokens[-1])
        rounds = Rounds(
            stack,
            stack.work / "sessions.tsv",
            args.seconds,
            args.connections,
            openresty_sessions=stack.work / OPENRESTY_SESSIONS,
        )
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
        openresty=openresty.versions() if "openresty" in args.paths else "",
    )
    return render(setup, rounds.measured, ledger_ok)


def parser() -> argparse.ArgumentParser:
    """The command line of ``./hb bench``."""
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes behind HAProxy (default 2)"
    )
    parser.add_argument("--seconds", type=int, help=f"per wrk run (default {FULL['seconds']})")
    parser.add_argument(
        "--connections", type=int, default=64, help="wrk's open connections (default 64)"
    )
    parser.add_argument("--players", type=int, help=f"default {FULL['players']:,}")
    parser.add_argument("--rounds", type=int, help=f"default {FULL['rounds']}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: "
        + " ".join(f"--{k} {v}" for k, v in QUICK.items())
        + " unless given (numbers too noisy to quote)",
    )
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
    if any(arg.partition("=")[0] == "--redis-cluster" for arg in sys.argv[1:]):
        # The settlement path on a local Redis Cluster, with its own flags.
        cluster.main(sys.argv[1:])
        return
    cli = parser()
    args = cli.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        cli.error(f"unknown paths: {', '.join(sorted(unknown))}")
    after = [p for p in AFTER_GRAB if p in args.paths]
    if after and "grab" not in args.paths:
        cli.error(f"{', '.join(after)} run after the grab path: add grab")
    if shutil.which("wrk") is None or shutil.which("haproxy") is None:
        sys.exit("bench needs wrk and haproxy: apt-get install -y wrk haproxy")
    if "openresty" in args.paths and openresty.nginx_binary() is None:
        sys.exit(
            "bench needs nginx with ngx_lua for the OpenResty comparison: "
            "apt-get install -y nginx-light libnginx-mod-http-lua (or --paths without openresty)"
        )
    print(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
