"""The one middleware every request passes through.

It does, in a single frame (each aiohttp middleware costs a coroutine and a wrapper on
every request, and the closed-window paths are mostly this fixed cost):

- the X-Request-ID: HAProxy's, else one made here, echoed on the response;
- the CSRF same-origin check for unsafe player requests (app.web.csrf);
- operators on /api/admin/*: who calls, what their role allows, the audit log
  (app.web.operators);
- errors as JSON: ApiError, aiohttp's HTTP errors, stores that are down (503, with
  failed Redis calls counted) and crashes (500);
- request metrics and one JSON access-log line, with the status the client gets;
- the request id in app.logs.CURRENT_REQUEST_ID, so application log lines carry it too.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from redis.exceptions import RedisError

from app.errors import ApiError, http_error_response, json_response
from app.logs import CURRENT_REQUEST_ID
from app.metrics import Metrics, Pseudonyms
from app.settings import Settings
from app.web.accesslog import AccessLog, RoutineResponse
from app.web.csrf import configured_origin, csrf_refused
from app.web.keys import OPENID, OPERATOR
from app.web.operators import ADMIN_PREFIX, audit, authenticate

log = logging.getLogger("hongbao.errors")

REQUEST_ID_HEADER = "X-Request-ID"
# A client-chosen request id longer than this is replaced (it ends up in every log line).
MAX_REQUEST_ID_LEN = 64
# ... as is one with other characters: it is echoed in a response header, which must
# encode (a settled grab is always answered with its result), and written to logs.
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LEN}}}")
# Route label of requests that matched no route: one value, not one per scanned path.
UNMATCHED = "unmatched"
# Health checks and scrapes arrive every few seconds from every balancer and Prometheus;
# they are counted in the metrics, but logged only when they fail.
QUIET_ROUTES = frozenset({"/healthz", "/healthz/ledger", "/readyz", "/metrics"})

_UNAVAILABLE = {"error": "unavailable", "message": "service temporarily unavailable"}
_CSRF = {"error": "csrf", "message": "cross-site request refused; use the campaign page"}


def route_template(request: web.Request) -> str:
    """The matched route's template (``/api/campaigns/{id}/grab``), never the raw path."""
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


class RequestIds:
    """Request ids for requests that arrive without one: a random per-process prefix and
    a counter, unique across workers without a system call per request."""

    def __init__(self) -> None:
        self._prefix = os.urandom(5).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):06x}"


def _error_response(request: web.Request, exc: Exception, metrics: Metrics) -> web.Response:
    """The JSON answer to ``exc``, raised by a handler (a redirect is raised on)."""
    if isinstance(exc, ApiError):
        return json_response(exc.body(), status=exc.status)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return http_error_response(exc)
    if isinstance(exc, RedisError):
        metrics.count_redis_error()
        log.warning("redis unavailable on %s %s: %r", request.method, request.path, exc)
        return json_response(_UNAVAILABLE, status=503)
    if isinstance(exc, (asyncpg.PostgresConnectionError, OSError)):
        # A store is down or overloaded: the client may retry; nothing was settled twice
        # because every settlement is one atomic script call.
        log.warning("store unavailable on %s %s: %r", request.method, request.path, exc)
        return json_response(_UNAVAILABLE, status=503)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return json_response({"error": "internal", "message": "internal error"}, status=500)


def edge_middleware(settings: Settings, metrics: Metrics, access_log: AccessLog) -> Middleware:
    """The middleware, closed over what it records to (no app lookups per request)."""
    request_ids = RequestIds()
    pseudonyms = Pseudonyms(settings.log_salt)
    log_requests = settings.access_log
    sample = settings.access_log_sample
    routine_answers = itertools.count()
    origin = configured_origin(settings.public_base_url)
    pid = os.getpid()

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = request_ids()
        status = 500
        routine = False
        # The request state handlers left, read once: a Mapping's ``in`` and ``get`` of a
        # missing key raise and catch a KeyError (a few thousand instructions each).
        state: set[Any] | None = None
        # Application log lines written while this request is handled carry its id.
        request_id_token = CURRENT_REQUEST_ID.set(request_id)
        try:
            # The handler's answer, or the JSON error it ends in; in this frame, not a
            # coroutine of its own, and the request state read only when needed (an
            # operator to audit, an access line): measured, sold out 222.9k -> 219.7k
            # instructions per request (python -m bench.instructions).
            admin = False
            response: web.StreamResponse
            try:
                if csrf_refused(request, origin):
                    response = json_response(_CSRF, status=403)
                else:
                    admin = request.path.startswith(ADMIN_PREFIX)
                    if admin:
                        await authenticate(request)
                    response = await handler(request)
            except Exception as exc:
                response = _error_response(request, exc, metrics)
            status = response.status
            routine = isinstance(response, RoutineResponse)
            # Only admin requests have an operator to audit (app.web.operators).
            if admin:
                state = set(request)
                if OPERATOR in state:
                    await audit(request, status)
            if not response.prepared:
                response.headers[REQUEST_ID_HEADER] = request_id
            return response
        except web.HTTPException as exc:  # a redirect
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        finally:
            CURRENT_REQUEST_ID.reset(request_id_token)
            elapsed = time.perf_counter() - start
            route = route_template(request)
            metrics.observe_request(route, request.method, status, elapsed)
            if (
                log_requests
                and (status != 200 or route not in QUIET_ROUTES)
                and (not routine or not next(routine_answers) % sample)
            ):
                if state is None:
                    state = set(request)
                openid = request[OPENID] if OPENID in state else None
                line = {
                    "ts": time.time(),
                    "level": "ERROR" if status >= 500 else "INFO",
                    "pid": pid,
                    "request_id": request_id,
                    "route": route,
                    "method": request.method,
                    "status": status,
                    # Whole microseconds, in ms: round(x, 3)'s digits (truncated, not
                    # rounded) at a third of its cost.
                    "duration_ms": int(elapsed * 1e6) / 1000,
                    "user": None if openid is None else pseudonyms(openid),
                }
                if routine:
                    line["sample"] = sample
                access_log.emit(line)

    return edge
