"""Who calls the admin API (/api/admin/*), what they may do, and the audit log.

The edge middleware (app.web.edge) calls ``authenticate`` before any handler of a path
under /api/admin/ and ``audit`` once such a request has its answer, so every admin
route, present or future, is covered without a middleware of its own (a middleware
costs every request, grabs included, a frame). Handlers then call ``require_admin``.

- ``Authorization: Bearer <token>``: ADMIN_TOKEN (the bootstrap operator ``admin``,
  checked in memory) or a named operator's token (app.identity.operators). Otherwise
  401; a named token PostgreSQL cannot check (down, or slower than AUTH_LOOKUP_S) 503.
- A ``viewer`` may only read (GET, HEAD): any other method is 403 forbidden.
- Every other method by an authenticated operator on a route that exists is written to
  the audit log with the status answered. A row that cannot be written (PostgreSQL down
  or slower than AUDIT_WRITE_S) does not refuse the call (pausing a campaign during an
  incident must work): it is logged at ERROR with all its fields instead, and counted
  in ``hongbao_audit_failures_total``.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from aiohttp import web

from app.errors import Forbidden, Unauthenticated, Unavailable
from app.identity.operators import Operator, Role
from app.logs import CURRENT_REQUEST_ID
from app.store.operators import AuditEntry
from app.web.keys import AUDITED_CAMPAIGN, METRICS, OPERATOR, OPERATORS

log = logging.getLogger("hongbao.audit")

ADMIN_PREFIX = "/api/admin/"
READS = frozenset({"GET", "HEAD"})
# A named token's lookup, and an audit row's write, wait at most this long for PostgreSQL.
AUTH_LOOKUP_S = 1.0
AUDIT_WRITE_S = 1.0
# PostgreSQL is unreachable, slow, or refuses (the tables not migrated yet).
_PG_FAILED = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_BEARER = b"Bearer "


async def authenticate(request: web.Request) -> None:
    """Set the request's operator from its bearer token; 401, 403 or 503 otherwise.

    A path or method no route serves is left to its 404 or 405 (the routes are public,
    in the OpenAPI document)."""
    if request.match_info.http_exception is not None:
        return
    # aiohttp keeps undecodable header bytes as surrogates: compare the bytes sent.
    header = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not header.startswith(_BEARER):
        raise Unauthenticated("admin token missing or wrong")
    try:
        async with asyncio.timeout(AUTH_LOOKUP_S):
            operator = await request.app[OPERATORS].verify(header[len(_BEARER) :])
    except _PG_FAILED as exc:
        log.warning("operator token not checked: %s", type(exc).__name__)
        raise Unavailable(
            "operator tokens cannot be checked now (PostgreSQL); ADMIN_TOKEN still works"
        ) from None
    if operator is None:
        raise Unauthenticated("admin token missing or wrong")
    request[OPERATOR] = operator
    if operator.role is not Role.ADMIN and request.method not in READS:
        raise Forbidden("this operator may only read (role viewer)")


def require_admin(request: web.Request) -> Operator:
    """The operator ``authenticate`` found (401 if none: not an /api/admin/ path)."""
    if OPERATOR not in request:
        raise Unauthenticated("admin token missing or wrong")
    return request[OPERATOR]


def client_address(request: web.Request) -> str | None:
    """Where the request came from: the address HAProxy forwards in X-Forwarded-For (it
    replaces whatever the client sent), else the peer's."""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded:
        return forwarded.rpartition(",")[2].strip()[:64] or request.remote
    return request.remote


async def audit(request: web.Request, status: int) -> None:
    """Record a state-changing call of an authenticated operator (see the module doc)."""
    operator = request.get(OPERATOR)
    if operator is None or request.method in READS:
        return
    entry = AuditEntry(
        operator=operator.name,
        role=operator.role,
        method=request.method,
        path=request.path,
        campaign_id=request.get(AUDITED_CAMPAIGN) or request.match_info.get("id"),
        status=status,
        remote=client_address(request),
        request_id=CURRENT_REQUEST_ID.get(),
    )
    try:
        async with asyncio.timeout(AUDIT_WRITE_S):
            await request.app[OPERATORS].record(entry)
    except _PG_FAILED as exc:
        request.app[METRICS].count_audit_failure()
        log.error(
            "audit row not written (%s): %s %s by %s (%s) -> %d, campaign %s, from %s",
            type(exc).__name__,
            entry.method,
            entry.path,
            entry.operator,
            entry.role,
            entry.status,
            entry.campaign_id,
            entry.remote,
        )
