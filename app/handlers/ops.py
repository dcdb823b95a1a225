"""Liveness and readiness."""

from __future__ import annotations

from aiohttp import web

from app.errors import json_response
from app.keys import PG, REDIS


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: Redis and PostgreSQL answer."""
    try:
        await request.app[REDIS].ping()
        await request.app[PG].fetchval("SELECT 1")
    except Exception as exc:
        return json_response({"status": "unavailable", "message": type(exc).__name__}, status=503)
    return json_response({"status": "ready"})


def setup(app: web.Application) -> None:
    """Register ops routes."""
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
