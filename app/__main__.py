"""Command line: ``python -m app <command>``. The only place that picks uvloop and logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import uvloop
from redis.asyncio import Redis

from app.access import ACCESS_LOGGER
from app.factory import create_app
from app.lifecycle import run_worker
from app.sessions import SessionStore
from app.settings import Settings, SettingsError
from app.supervisor import DEFAULT_DATA_DIR, EMBEDDED_REDIS_URL, serve


def _worker(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"hongbao: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_worker(create_app(settings), settings))


def _access_log_to_stdout() -> None:
    """Access-log records are already one JSON object each: write them bare to stdout.

    A record is made per request, so skip what no line of ours prints: the caller's
    frame, thread and process names (the logging HOWTO's "Optimization" switches).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger(ACCESS_LOGGER)
    access.addHandler(handler)
    access.propagate = False


async def _mint(count: int, prefix: str, ttl_s: int) -> list[tuple[str, str]]:
    redis = Redis.from_url(os.environ.get("REDIS_URL") or EMBEDDED_REDIS_URL)
    try:
        store = SessionStore(redis, ttl_s)
        openids = [f"{prefix}{i:08d}" for i in range(count)]
        tokens = await store.mint(openids)
    finally:
        await redis.aclose()
    return list(zip(openids, tokens, strict=True))


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="hongbao")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the service (embedded Redis/PostgreSQL if unset)")
    p_serve.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p_serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    p_serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p_serve.add_argument(
        "--no-haproxy", action="store_true", help="workers share the port even if haproxy exists"
    )
    sub.add_parser("worker", help="run one worker process (settings from the environment)")
    p_mint = sub.add_parser("mint-sessions", help="create N player sessions for load tests")
    p_mint.add_argument("--count", type=int, required=True)
    p_mint.add_argument("--out", type=Path, required=True)
    p_mint.add_argument("--prefix", default="load-")
    p_mint.add_argument("--ttl", type=int, default=24 * 3600)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _access_log_to_stdout()
    if args.command == "serve":
        return serve(args.workers, args.port, args.data_dir, use_haproxy=not args.no_haproxy)
    if args.command == "worker":
        return _worker(args)
    if args.command == "mint-sessions":
        pairs = asyncio.run(_mint(args.count, args.prefix, args.ttl))
        args.out.write_text("".join(f"{openid}\t{token}\n" for openid, token in pairs))
        print(f"wrote {args.count} sessions (openid<TAB>cookie value) to {args.out}")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
