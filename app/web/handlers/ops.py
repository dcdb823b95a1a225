"""Liveness, readiness and metrics."""

from __future__ import annotations

from aiohttp import web
from redis.exceptions import RedisError

from app.errors import json_response
from app.metrics import CONTENT_TYPE
from app.web.keys import METRICS, PG, READINESS, REDIS, SCRIPTS


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive (no store is consulted)."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: not draining, Redis and PostgreSQL answer, the Lua scripts are loaded.

    Scripts Redis lost (a restart or failover) are loaded again here, so a worker is
    ready again as soon as Redis is back.
    """
    if request.app[READINESS].draining:
        return json_response({"status": "draining"}, status=503)
    try:
        await request.app[SCRIPTS].ensure_loaded(request.app[REDIS])
        await request.app[PG].fetchval("SELECT 1")
    except Exception as exc:
        if isinstance(exc, RedisError):
            request.app[METRICS].count_redis_error()
        return json_response({"status": "unavailable", "message": type(exc).__name__}, status=503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: this worker's metrics in the Prometheus text format."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def setup(app: web.Application) -> None:
    """Register ops routes."""
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
