"""Command line: ``python -m app <command>``. The only place that picks uvloop and logging."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import asyncpg
import orjson
import uvloop
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app import logs
from app.background.drainer import drain_process
from app.campaigns import operations
from app.campaigns.service import CampaignService
from app.errors import ApiError, OperationError
from app.identity.operators import TOKEN_CACHE_S, OperatorDirectory, Role, render
from app.identity.sessions import SessionStore
from app.local.chaos import chaos
from app.local.fakewechat import FakeWeChat, create_fake_app
from app.local.fakewechatpay import create_fake_pay_app, fake_from_env, local_payout_env
from app.local.supervisor import DEFAULT_DATA_DIR, serve
from app.model import Kind
from app.payout import commands as payout_commands
from app.payout.client import open_client
from app.payout.worker import payout_process
from app.settings import (
    LedgerSettings,
    PayoutSettings,
    Settings,
    SettingsError,
    Stores,
    session_keys_from_env,
)
from app.store import ledger
from app.store.scripts import Scripts
from app.web.factory import create_app
from app.web.lifecycle import run_worker


class _Parser(argparse.ArgumentParser):
    """Bad flags end in one line naming the problem (exit code 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: message`` and exit with code 2."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``minimum`` (to ``maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {value}")
        return value

    return parse


COUNT = _whole(1)
PORT = _whole(1, 65535)


def _worker(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"hongbao: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_worker(create_app(settings), settings))


def _fake_wechatpay(args: argparse.Namespace) -> int:
    try:
        fake = fake_from_env()
    except (KeyError, OSError, ValueError) as exc:
        print(
            f"hongbao: fake-wechatpay needs the keys ./hb serve provisions ({exc})", file=sys.stderr
        )
        return 2
    return _run_fake(create_fake_pay_app(fake), args)


def _payout(args: argparse.Namespace) -> int:
    stores, settings = Stores.from_env(), PayoutSettings.from_env()
    if args.command == "payout-retry":
        numbers = asyncio.run(payout_commands.retry(stores.database_url, args.campaign_id))
        print(f"{len(numbers)} failed or cancelled bill(s) of {args.campaign_id} queued again")
        for number in numbers:
            print(f"  {number}")
        return 0
    if not settings.enabled:
        print("hongbao payout: set WECHATPAY_MCHID and the WeChat Pay keys", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(payout_process(stores.redis_url, stores.database_url, settings))
    return 0


def _fake_wechat(args: argparse.Namespace) -> int:
    appid, secret = os.environ.get("WECHAT_APPID", ""), os.environ.get("WECHAT_SECRET", "")
    if not appid or not secret:
        print("hongbao: fake-wechat needs WECHAT_APPID and WECHAT_SECRET", file=sys.stderr)
        return 2
    return _run_fake(create_fake_app(FakeWeChat(appid, secret)), args)


def _run_fake(app: web.Application, args: argparse.Namespace) -> int:
    """Serve a fake of the outside world on ``--host``/``--port`` until interrupted."""
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )
    return 0


async def _mint(count: int, prefix: str, ttl_s: int) -> list[tuple[str, str]]:
    redis = Redis.from_url(Stores.from_env().redis_url)
    try:
        store = SessionStore(redis, ttl_s, keys=session_keys_from_env())
        openids = [f"{prefix}{i:08d}" for i in range(count)]
        tokens = await store.mint(openids)
    finally:
        await redis.aclose()
    return list(zip(openids, tokens, strict=True))


async def _create_campaign(args: argparse.Namespace) -> dict[str, object]:
    stores = Stores.from_env()
    redis = Redis.from_url(stores.redis_url)
    pg = await asyncpg.create_pool(stores.database_url, min_size=1, max_size=2)
    try:
        await ledger.migrate(pg)
        service = CampaignService(redis, pg, Scripts(redis), batch_max=1)
        started = time.monotonic()

        def progress(done: int, total: int) -> None:
            print(
                f"\rloading envelopes into Redis: {done:,}/{total:,} "
                f"({100 * done // total}%, {time.monotonic() - started:.1f}s)",
                end="",
                file=sys.stderr,
                flush=True,
            )

        body = {
            "kind": Kind.RED_PACKET,
            "name": args.name,
            "total_fen": args.total_fen,
            "count": args.count,
            "min_fen": args.min_fen,
            "max_fen": args.max_fen,
            "starts_at": args.starts_at,
            "ends_at": args.ends_at,
        }
        campaign = await service.create(body, progress)
        print(file=sys.stderr)
        stats = await service.stats(campaign.id)
        stats["seconds"] = round(time.monotonic() - started, 2)
        return stats
    finally:
        await pg.close()


async def _operate(command: str, campaign_id: str) -> int:
    stores = Stores.from_env()
    redis = Redis.from_url(stores.redis_url)
    pool = await asyncpg.create_pool(stores.database_url, min_size=1, max_size=2)
    try:
        if command == "reconcile":
            # Against the embedded stores, the local run's fake WeChat Pay answers queries.
            local = {} if stores.database_given else local_payout_env(DEFAULT_DATA_DIR)
            payout_settings = PayoutSettings.from_env({**local, **os.environ})
            async with open_client(redis, payout_settings) as wechat:
                report = await operations.reconcile(redis, pool, campaign_id, wechat)
            print(report.render())
            return 0 if report.ok else 1
        print((await operations.rebuild(redis, pool, campaign_id)).render())
        return 0
    except OperationError as exc:
        print(f"hongbao {command}: {exc}", file=sys.stderr)
        return 2
    except asyncpg.UndefinedTableError:
        print(
            f"hongbao {command}: PostgreSQL at {stores.database_url} has no hongbao tables "
            "(is this the service's database?)",
            file=sys.stderr,
        )
        return 2
    finally:
        await pool.close()
        await redis.aclose()


async def _operator(args: argparse.Namespace) -> int:
    """``operator add|list|revoke``: named operators in PostgreSQL."""
    pool = await asyncpg.create_pool(Stores.from_env().database_url, min_size=1, max_size=2)
    try:
        await ledger.migrate(pool)
        directory = OperatorDirectory(pool)
        if args.action == "add":
            token = await directory.add(args.name, Role(args.role))
            print(f"operator {args.name} ({args.role}) added; its token, shown only this once:")
            print(token)
        elif args.action == "revoke":
            await directory.revoke(args.name)
            print(f"operator {args.name} revoked: refused everywhere within {TOKEN_CACHE_S:g} s")
        else:
            print(render(await directory.list()))
        return 0
    except OperationError as exc:
        print(f"hb operator {args.action}: {exc}", file=sys.stderr)
        return 2
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = _Parser(prog="hongbao")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the service (embedded Redis/PostgreSQL if unset)")
    p_serve.add_argument("--workers", type=COUNT, default=os.cpu_count() or 1)
    p_serve.add_argument("--port", type=PORT, default=os.environ.get("PORT", "8080"))
    p_serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p_serve.add_argument(
        "--no-haproxy", action="store_true", help="workers share the port even if haproxy exists"
    )
    sub.add_parser("worker", help="run one worker process (settings from the environment)")
    p_fake = sub.add_parser("fake-wechat", help="run the fake WeChat (WECHAT_APPID/SECRET)")
    p_fake.add_argument("--host", default="127.0.0.1")
    p_fake.add_argument("--port", type=PORT, required=True)
    p_pay = sub.add_parser("fake-wechatpay", help="run the fake WeChat Pay (keys: ./hb serve)")
    p_pay.add_argument("--host", default="127.0.0.1")
    p_pay.add_argument("--port", type=PORT, required=True)
    sub.add_parser("payout", help="run one payout worker (outbox -> WeChat Pay transfer bills)")
    p_retry = sub.add_parser("payout-retry", help="retry a campaign's failed or cancelled bills")
    p_retry.add_argument("campaign_id")
    p_mint = sub.add_parser("mint-sessions", help="create N player sessions for load tests")
    p_mint.add_argument("--count", type=COUNT, required=True)
    p_mint.add_argument("--out", type=Path, required=True)
    p_mint.add_argument("--prefix", default="load-")
    p_mint.add_argument("--ttl", type=COUNT, default=24 * 3600)
    p_create = sub.add_parser(
        "create-campaign", help="create a red packet from the shell, with load progress"
    )
    p_create.add_argument("--name", required=True)
    p_create.add_argument("--total-fen", type=int, required=True)
    p_create.add_argument("--count", type=COUNT, required=True)
    p_create.add_argument("--min-fen", type=int, default=1)
    p_create.add_argument("--max-fen", type=int, default=None)
    p_create.add_argument("--starts-at", default=None, help="RFC 3339")
    p_create.add_argument("--ends-at", default=None, help="RFC 3339")
    sub.add_parser("drain", help="run one ledger drainer process (Redis stream -> PostgreSQL)")
    p_rec = sub.add_parser("reconcile", help="compare a campaign in Redis and PostgreSQL")
    p_rec.add_argument("campaign_id")
    p_reb = sub.add_parser("rebuild", help="restore a campaign lost from Redis, from PostgreSQL")
    p_reb.add_argument("campaign_id")
    p_op = sub.add_parser(
        "operator",
        help="add, list or revoke named operators (admin or viewer tokens)",
        description="Named operators of the admin API, kept in PostgreSQL (DATABASE_URL). "
        "ADMIN_TOKEN stays the bootstrap admin, named admin.",
    )
    op_sub = p_op.add_subparsers(dest="action", required=True, metavar="<action>")
    p_op_add = op_sub.add_parser("add", help="add one and print its token (shown only once)")
    p_op_add.add_argument("name", help="1-50 visible characters, e.g. 值班-小王")
    p_op_add.add_argument(
        "--role",
        choices=[str(r) for r in Role],
        required=True,
        help="admin: everything; viewer: reads only (GET)",
    )
    op_sub.add_parser("list", help="every operator, live and revoked (never their tokens)")
    p_op_revoke = op_sub.add_parser(
        "revoke", help=f"revoke one's token (refused everywhere within {TOKEN_CACHE_S:g} s)"
    )
    p_op_revoke.add_argument("name", help="the operator's name")
    p_chaos = sub.add_parser(
        "chaos", help="kill and stall each part of a local stack under load; check the books"
    )
    p_chaos.add_argument("--appendfsync", choices=("always", "everysec"), default="always")
    p_chaos.add_argument("--short", action="store_true", help="shorter faults (~1-2 min, CI)")
    p_chaos.add_argument("--dir", type=Path, help="keep the run's data and logs here")
    args = parser.parse_args(argv)

    logs.configure()
    try:
        return _dispatch(args)
    except (OSError, RedisError, SettingsError) as exc:
        # Stores that do not answer, or settings that do not parse: one line, no traceback.
        print(f"hongbao {args.command}: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return serve(args.workers, args.port, args.data_dir, use_haproxy=not args.no_haproxy)
    if args.command == "worker":
        return _worker(args)
    if args.command == "fake-wechat":
        return _fake_wechat(args)
    if args.command == "fake-wechatpay":
        return _fake_wechatpay(args)
    if args.command in ("payout", "payout-retry"):
        return _payout(args)
    if args.command == "mint-sessions":
        pairs = asyncio.run(_mint(args.count, args.prefix, args.ttl))
        args.out.write_text("".join(f"{openid}\t{token}\n" for openid, token in pairs))
        print(f"wrote {args.count} sessions (openid<TAB>cookie value) to {args.out}")
        return 0
    if args.command == "create-campaign":
        try:
            stats = asyncio.run(_create_campaign(args))
        except ApiError as exc:
            print(f"hongbao: {exc}", file=sys.stderr)
            return 2
        print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
        return 0
    if args.command == "drain":
        try:
            ledger_settings = LedgerSettings.from_env()
            stores = Stores.from_env()
        except SettingsError as exc:
            print(f"hongbao: {exc}", file=sys.stderr)
            return 2
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(drain_process(stores.redis_url, stores.database_url, ledger_settings))
        return 0
    if args.command == "operator":
        return asyncio.run(_operator(args))
    if args.command == "chaos":
        return chaos(args.appendfsync, args.short, args.dir)
    if args.command in ("reconcile", "rebuild"):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_operate(args.command, args.campaign_id))
    raise AssertionError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
