"""Liveness, readiness, ledger health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from app.errors import json_response
from app.metrics import CONTENT_TYPE
from app.store import payouts
from app.web.keys import METRICS, PG, READINESS, REDIS, SCRIPTS, SETTINGS
from app.web.readiness import LEDGER_PROBE_EVERY_S, LEDGER_PROBE_TIMEOUT_S, LoopWatch, ledger_up


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive (no store is consulted)."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: can serve grabs (not draining, Redis answers, scripts loaded).

    PostgreSQL is not consulted (see app.web.readiness). Scripts Redis lost (a restart
    or failover) are loaded again here, so a worker is ready again as soon as Redis is
    back.
    """
    if request.app[READINESS].draining:
        return json_response({"status": "draining"}, status=503)
    scripts = request.app[SCRIPTS]
    try:
        # Each call is bounded by REDIS_TIMEOUT_MS; this bounds the probe as a whole.
        async with asyncio.timeout(2 * request.app[SETTINGS].redis_timeout_ms / 1000):
            await scripts.ensure_loaded(request.app[REDIS])
            await scripts.ping_line()
    except (RedisError, TimeoutError) as exc:
        request.app[METRICS].count_redis_error()
        return json_response({"status": "unavailable", "message": type(exc).__name__}, status=503)
    return json_response({"status": "ready"})


async def ledger_health(request: web.Request) -> web.Response:
    """GET /healthz/ledger: whether PostgreSQL (the ledger) answers; never readiness."""
    if await ledger_up(request.app[PG], request.app[METRICS]):
        return json_response({"ledger": "up"})
    return json_response(
        {
            "error": "ledger_down",
            "message": "PostgreSQL does not answer; grabs go on, the ledger lags",
            "ledger": "down",
        },
        status=503,
    )


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: this worker's metrics in the Prometheus text format."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def _probe_ledger(app: web.Application) -> None:
    metrics, payouts_on = app[METRICS], app[SETTINGS].payout.enabled
    while True:
        if await ledger_up(app[PG], metrics) and payouts_on:
            with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError):
                async with asyncio.timeout(LEDGER_PROBE_TIMEOUT_S):
                    metrics.set_payout_backlog(await payouts.backlog(app[PG]))
        await asyncio.sleep(LEDGER_PROBE_EVERY_S)


async def health_ctx(app: web.Application) -> AsyncIterator[None]:
    """For the life of the worker: probe the event loop for stalls, and PostgreSQL
    every LEDGER_PROBE_EVERY_S for ``hongbao_ledger_up`` (a scrape never waits on it)."""
    watch = LoopWatch(app[METRICS])
    watch.start()
    prober = asyncio.create_task(_probe_ledger(app), name="ledger-probe")
    yield
    prober.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await prober
    watch.stop()


def setup(app: web.Application) -> None:
    """Register ops routes and the health probes."""
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/healthz/ledger", ledger_health, name="ledger_health")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.cleanup_ctx.append(health_ctx)
