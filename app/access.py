"""The observe middleware: request metrics, one JSON access-log line, X-Request-ID."""

from __future__ import annotations

import os
import time

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from app.keys import ACCESS_LOG, METRICS, OPENID, SETTINGS
from app.metrics import hash_openid

REQUEST_ID_HEADER = "X-Request-ID"
# A client-chosen request id longer than this is replaced (it ends up in every log line).
MAX_REQUEST_ID_LEN = 64
# Route label of requests that matched no route: one value, not one per scanned path.
UNMATCHED = "unmatched"
# Health checks and scrapes arrive every few seconds from every balancer and Prometheus;
# they are counted in the metrics, but logged only when they fail.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


def route_template(request: web.Request) -> str:
    """The matched route's template (``/api/campaigns/{id}/grab``), never the raw path."""
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request, log it as one JSON line, echo its X-Request-ID.

    Sits outside the error middleware, so it sees the status the client gets. The
    request id comes from the load balancer (HAProxy sets it when absent), else is made
    here. The openid is logged only as a salted hash.
    """
    start = time.perf_counter()
    request_id = request.headers.get(REQUEST_ID_HEADER)
    if not request_id or len(request_id) > MAX_REQUEST_ID_LEN:
        request_id = os.urandom(8).hex()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except web.HTTPException as exc:
        status = exc.status
        exc.headers[REQUEST_ID_HEADER] = request_id
        raise
    finally:
        elapsed = time.perf_counter() - start
        route = route_template(request)
        app = request.app
        app[METRICS].observe_request(route, request.method, status, elapsed)
        settings = app[SETTINGS]
        if settings.access_log and (status != 200 or route not in QUIET_ROUTES):
            openid = request.get(OPENID)
            line = {
                "request_id": request_id,
                "route": route,
                "method": request.method,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "user": None if openid is None else hash_openid(openid, settings.log_salt),
            }
            app[ACCESS_LOG].emit(line)


@web.middleware
async def redis_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count failed Redis calls; the error middleware outside renders them as 503."""
    try:
        return await handler(request)
    except RedisError:
        request.app[METRICS].count_redis_error()
        raise
