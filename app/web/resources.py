"""Cleanup contexts: one per resource, created at start-up and closed at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
from aiohttp import web

from app.background.drainer import Drainer, consumer_name
from app.background.events import Events
from app.background.lag import watch_lag
from app.background.tasks import stop_loop
from app.campaigns.results import Results
from app.campaigns.service import CampaignService
from app.identity.login import LoginService
from app.identity.operators import OperatorDirectory
from app.identity.sessions import SessionStore
from app.identity.wechat import WeChatClient
from app.model import now_ms
from app.payout.service import PayoutService
from app.store import ledger
from app.store.client import open_redis
from app.store.scriptline import ClusterLine, ScriptLine
from app.store.scripts import Scripts
from app.web.assets import Assets
from app.web.keys import (
    ASSETS,
    CAMPAIGNS,
    EVENTS,
    LOGINS,
    METRICS,
    OPERATORS,
    PAYOUTS,
    PG,
    REDIS,
    RESULTS,
    SCRIPTS,
    SESSIONS,
    SETTINGS,
)

log = logging.getLogger("hongbao.resources")


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Redis client, with every Lua script loaded (a broken script stops start-up)."""
    settings = app[SETTINGS]
    timeout_s = settings.redis_timeout_ms / 1000
    # Every call is bounded: connect and reply within REDIS_TIMEOUT_MS, and (redis-py's
    # default) never retried, so a pub/sub connection that broke is seen to break.
    redis = open_redis(
        settings.redis_url,
        cluster=settings.redis_cluster,
        max_connections=settings.redis_max_connections,
        timeout_s=timeout_s,
    )
    wait = settings.redis_wait_replicas
    line = (
        ClusterLine.from_url(settings.redis_url, timeout_s, wait)
        if settings.redis_cluster
        else ScriptLine.from_url(settings.redis_url, timeout_s, wait)
    )
    scripts = Scripts(redis, line)
    await scripts.preload(redis)
    app[REDIS] = redis
    app[SCRIPTS] = scripts
    yield
    if line is not None:
        line.close()
    await redis.aclose()


# PostgreSQL errors that mean "not reachable now", not "refused this".
PG_DOWN = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
# How long start-up waits for PostgreSQL to apply the migrations before it serves without.
PG_START_WAIT_S = 5.0
PG_RETRY_MAX_S = 10.0


async def _migrate(pool: asyncpg.Pool) -> None:
    applied = await asyncio.wait_for(ledger.migrate(pool), PG_START_WAIT_S)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))


async def _migrate_when_back(pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    """Retry the migrations, with back-off, until PostgreSQL takes them or we stop."""
    delay = 0.5
    while not stop.is_set():
        try:
            await _migrate(pool)
            log.info("PostgreSQL is back: migrations checked")
            return
        except PG_DOWN:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, PG_RETRY_MAX_S)


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    """The asyncpg pool, with migrations applied.

    A worker (re)started while PostgreSQL is down still starts: grabs and draws need only
    Redis, the drainer retries its writes, and the migrations are applied once PostgreSQL
    answers again.
    """
    settings = app[SETTINGS]
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=0, max_size=settings.pg_pool_max
    )
    stop = asyncio.Event()
    waiting: asyncio.Task[None] | None = None
    try:
        await _migrate(pool)
    except PG_DOWN as exc:
        log.warning(
            "PostgreSQL unreachable at start-up (%s); serving without it", type(exc).__name__
        )
        waiting = asyncio.create_task(_migrate_when_back(pool, stop), name="migrations")
    app[PG] = pool
    yield
    if waiting is not None:
        await stop_loop(waiting, stop)
    await pool.close()


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    """Domain services over Redis and PostgreSQL; in-flight batches finish on shutdown."""
    settings = app[SETTINGS]
    events = Events(app[REDIS], app[METRICS])
    sessions = SessionStore(
        app[REDIS],
        settings.session_ttl_s,
        keys=settings.session_keys,
        events=events,
        line=app[SCRIPTS].line,
    )
    payouts = PayoutService(app[PG], app[REDIS], settings.payout)
    campaigns = CampaignService(
        app[REDIS],
        app[PG],
        app[SCRIPTS],
        batch_max=settings.grab_batch_max,
        events=events,
        payouts=payouts,
        # HB_CLOCK_SKEW_MS (tests only) skews this worker's clock; Redis's still decides.
        clock=lambda: now_ms() + settings.clock_skew_ms,
    )
    app[PAYOUTS] = payouts
    app[OPERATORS] = OperatorDirectory(app[PG], settings.admin_token)
    app[EVENTS] = events
    app[SESSIONS] = sessions
    app[CAMPAIGNS] = campaigns
    app[RESULTS] = Results(campaigns, app[REDIS], app[PG])
    stop = asyncio.Event()
    listener = asyncio.create_task(events.run(stop), name="events")
    yield
    await stop_loop(listener, stop)
    await campaigns.drain()
    await sessions.drain()


# WeChat answers in well under a second; a stuck exchange must not hold the player long.
WECHAT_TIMEOUT = aiohttp.ClientTimeout(total=5, connect=2)


async def wechat_ctx(app: web.Application) -> AsyncIterator[None]:
    """One HTTP client session for WeChat's API, and the login service over it."""
    settings = app[SETTINGS]
    async with aiohttp.ClientSession(timeout=WECHAT_TIMEOUT, raise_for_status=False) as http:
        client = WeChatClient(
            http,
            appid=settings.wechat_appid,
            secret=settings.wechat_secret,
            authorize_url=settings.wechat_authorize_url,
            api_base=settings.wechat_api_base,
            scope=settings.wechat_scope,
        )
        app[LOGINS] = LoginService(app[REDIS], app[SCRIPTS], app[SESSIONS], client, names=app[PG])
        yield


async def assets_ctx(app: web.Application) -> AsyncIterator[None]:
    """The H5 page and its assets, read once (a missing file stops start-up)."""
    app[ASSETS] = Assets.load()
    yield


async def drainer_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample the ledger lag, and run a drainer (unless LEDGER_DRAIN_IN_WORKER=0), in this
    worker; stop both at shutdown."""
    settings = app[SETTINGS]
    stop_sampling = asyncio.Event()
    watcher = asyncio.create_task(
        watch_lag(app[REDIS], app[METRICS], stop_sampling), name="ledger-lag"
    )
    if not settings.ledger.drain_in_worker:
        yield
        await stop_loop(watcher, stop_sampling)
        return
    drainer = Drainer(app[REDIS], app[PG], settings.ledger, consumer_name(), metrics=app[METRICS])
    task = asyncio.create_task(drainer.run(), name="ledger-drainer")
    yield
    await stop_loop(watcher, stop_sampling)
    drainer.stop()
    try:
        await asyncio.wait_for(task, settings.shutdown_timeout_s)
    except TimeoutError:
        log.warning("drainer %s did not stop in time; cancelled", drainer.consumer)
