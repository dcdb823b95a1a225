"""The published API contract: an OpenAPI 3.1 document, served at GET /api/openapi.json.

Request bodies are described by the msgspec structs that decode them (app.validation),
answers by the structs of app.web.handlers.answers; msgspec makes the JSON Schema of
both, so the document cannot drift from what is validated. Each operation is written
once below; the document holds those of the routes the app has registered (dev-login
only where it is enabled), and a test fails on any registered route not described.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
from aiohttp import web

from app.lottery.spec import LotteryDefinition
from app.redpacket.spec import RedPacketDefinition
from app.web.handlers import answers as a
from app.web.handlers.admin_reads import AuditQuery, CampaignQuery
from app.web.handlers.auth import DevLogin
from app.web.handlers.h5 import IDEMPOTENCY_KEY
from app.web.keys import OPENAPI

PATH = "/api/openapi.json"
TITLE = "hongbao 红包"
VERSION = "1"
CACHE_CONTROL = "public, max-age=300"
JSON = "application/json"
HTML = "text/html"
SCHEMAS = "#/components/schemas/"

# What a description of a body may be: a struct, alternatives, or a ready schema.
Body = type[msgspec.Struct] | tuple[type[msgspec.Struct], ...] | dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Answer:
    """One documented response: a status, and a JSON body, error codes or other media."""

    status: int
    description: str
    body: Body = None
    errors: tuple[str, ...] = ()
    media: str = JSON
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """One route and method, as the document describes it."""

    method: str
    path: str
    summary: str
    answers: tuple[Answer, ...]
    request: Body = None
    security: str | None = None
    query: tuple[str, ...] = ()
    headers: tuple[dict[str, Any], ...] = ()
    tags: tuple[str, ...] = ()
    # The query parameters as the struct that decodes them (app.validation.read_query).
    query_struct: type[msgspec.Struct] | None = None


def _campaign_id() -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "the campaign id (16 hex digits as created)",
    }


_NOT_FOUND = Answer(404, "no such campaign", errors=("not_found",))
_WINDOW = Answer(
    409,
    "outside the campaign's window, paused by an operator, or the other kind of campaign",
    errors=("not_started", "ended", "paused", "wrong_kind"),
)
_SESSION = (
    Answer(400, "more than one session cookie", errors=("bad_request",)),
    Answer(401, "no session, or an unknown or expired one", errors=("unauthenticated",)),
)
_PLAYER_POST = Answer(
    403,
    "cross-site request (send Origin, Referer or X-Requested-With: hongbao), or a WeChat "
    "snapshot-page visitor (reason snapshot_user)",
    errors=("csrf", "forbidden"),
)
_ADMIN = Answer(
    401, "Authorization: Bearer <operator token> missing or wrong", errors=("unauthenticated",)
)
# Every admin operation that changes state may meet this (added to each below).
_VIEWER = Answer(403, "a viewer's token: viewers may only read", errors=("forbidden",))
_LIST_QUERY = Answer(422, "a query parameter is invalid; field names it", errors=("invalid",))
_BODY = (
    Answer(400, "the body is not a JSON object", errors=("invalid_json",)),
    Answer(413, "the body is over the size limit", errors=("payload_too_large",)),
    Answer(422, "a field is invalid; field names it in full", errors=("invalid",)),
)
_REDIRECT = Answer(302, "to Location", media="", headers=("Location",))
_HTML_PAGE = {"type": "string", "description": "an HTML page"}
# Every operation may meet these: HAProxy's limits, a store that is down, a crash.
_ANYWHERE = (
    Answer(429, "rate limited by HAProxy (per address or session)", errors=("rate_limited",)),
    Answer(500, "internal error", errors=("internal",)),
    Answer(503, "a store is unavailable, or no worker is", errors=("unavailable",)),
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "get",
        "/api/campaigns/{id}",
        "A campaign as players see it (no session needed)",
        (Answer(200, "the campaign", (a.RedPacketView, a.LotteryView)), _NOT_FOUND),
        tags=("players",),
    ),
    Operation(
        "get",
        "/api/campaigns/{id}/results",
        "A campaign's results (no session needed; cacheable, see Cache-Control)",
        (
            Answer(
                200,
                "a red packet's 手气最佳 and winners, final; a lottery's prizes and winners",
                (a.RedPacketResults, a.LotteryResults),
                headers=("Cache-Control",),
            ),
            _NOT_FOUND,
            Answer(409, "the red packet has not sold out or ended yet", errors=("not_finished",)),
        ),
        tags=("players",),
    ),
    Operation(
        "post",
        "/api/campaigns/{id}/grab",
        "Grab one envelope of a red packet (one per player)",
        (
            Answer(200, "the grab's result", (a.Grabbed, a.SoldOut)),
            *_SESSION,
            _PLAYER_POST,
            _NOT_FOUND,
            _WINDOW,
        ),
        security="session",
        tags=("players",),
    ),
    Operation(
        "get",
        "/api/campaigns/{id}/me",
        "What this player has won in a campaign",
        (
            Answer(200, "the player's result", (a.EnvelopeWon, a.NothingWon, a.LotteryMine)),
            *_SESSION,
            _NOT_FOUND,
        ),
        security="session",
        tags=("players",),
    ),
    Operation(
        "post",
        "/api/campaigns/{id}/draw",
        "Draw once in a lottery (within the player's quotas)",
        (
            Answer(200, "the draw's result", (a.PrizeDrawn, a.NoPrize)),
            *_SESSION,
            _PLAYER_POST,
            _NOT_FOUND,
            _WINDOW,
            Answer(422, "a malformed Idempotency-Key", errors=("invalid",)),
            Answer(429, "quotas used up (scope total or daily)", errors=("quota_exhausted",)),
        ),
        security="session",
        headers=(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "a retry under the same key answers the draw already made",
                "schema": {"type": "string", "pattern": f"^{IDEMPOTENCY_KEY.pattern}$"},
            },
        ),
        tags=("players",),
    ),
    Operation(
        "post",
        "/api/campaigns/{id}/claim",
        "Claim the player's winnings through WeChat Pay (where payouts are configured)",
        (
            Answer(200, "a bill to confirm, or none", (a.PayoutClaim, a.NothingToClaim)),
            *_SESSION,
            _PLAYER_POST,
            _NOT_FOUND,
            Answer(404, "nothing to pay out to this player (yet)", errors=("no_payout",)),
            Answer(409, "the bill is still queued (queue_position)", errors=("payout_not_ready",)),
            Answer(503, "payouts are not configured here", errors=("payouts_off",)),
        ),
        security="session",
        tags=("players",),
    ),
    Operation(
        "post",
        "/api/wechatpay/notify",
        "WeChat Pay's notification of a bill's state (signed by WeChat Pay; no CSRF check)",
        (
            Answer(204, "applied (or already applied)", media=""),
            Answer(400, "malformed, replayed or not about our bill", a.WeChatPayFail),
            Answer(401, "the signature is refused", a.WeChatPayFail),
            Answer(404, "no such bill, or payouts are not configured", a.WeChatPayFail),
        ),
        request={"type": "object", "description": "WeChat Pay's encrypted notification"},
        tags=("payouts",),
    ),
    Operation(
        "post",
        "/api/admin/campaigns",
        "Create a red packet or a lottery (by kind)",
        (
            Answer(201, "created: its live statistics", (a.RedPacketStats, a.LotteryStats)),
            *_BODY,
            _ADMIN,
        ),
        request=(RedPacketDefinition, LotteryDefinition),
        security="admin",
        tags=("operators",),
    ),
    Operation(
        "get",
        "/api/admin/campaigns/{id}",
        "A campaign's live statistics",
        (Answer(200, "the statistics", (a.RedPacketStats, a.LotteryStats)), _ADMIN, _NOT_FOUND),
        security="admin",
        tags=("operators",),
    ),
    Operation(
        "post",
        "/api/admin/campaigns/{id}/end",
        "End a campaign now and close it out: its leftovers return to the budget "
        "(idempotent: a repeat answers the same)",
        (
            Answer(200, "ended: its statistics", (a.RedPacketStats, a.LotteryStats)),
            _ADMIN,
            _NOT_FOUND,
        ),
        security="admin",
        tags=("operators",),
    ),
    Operation(
        "post",
        "/api/admin/campaigns/{id}/pause",
        "Pause a campaign: grabs and draws answer 409 paused until resumed (idempotent)",
        (
            Answer(200, "paused: its statistics", (a.RedPacketStats, a.LotteryStats)),
            _ADMIN,
            _NOT_FOUND,
            Answer(409, "the campaign has ended", errors=("ended",)),
        ),
        security="admin",
        tags=("operators",),
    ),
    Operation(
        "post",
        "/api/admin/campaigns/{id}/resume",
        "Resume a paused campaign (idempotent)",
        (
            Answer(200, "resumed: its statistics", (a.RedPacketStats, a.LotteryStats)),
            _ADMIN,
            _NOT_FOUND,
            Answer(409, "the campaign has ended", errors=("ended",)),
        ),
        security="admin",
        tags=("operators",),
    ),
    Operation(
        "get",
        "/api/admin/campaigns",
        "Campaigns newest first with their live state, a page at a time (any operator)",
        (Answer(200, "a page of campaigns", a.CampaignPage), _ADMIN, _LIST_QUERY),
        security="admin",
        query_struct=CampaignQuery,
        tags=("operators",),
    ),
    Operation(
        "get",
        "/api/admin/campaigns/{id}/winners.csv",
        "Every grant (red packet) or prize (lottery) with its payout state, as UTF-8 CSV "
        "streamed from PostgreSQL (any operator)",
        (
            Answer(200, "the CSV, with a header row", {"type": "string"}, media="text/csv"),
            _ADMIN,
            _NOT_FOUND,
        ),
        security="admin",
        tags=("operators",),
    ),
    Operation(
        "get",
        "/api/admin/audit",
        "The audit log: state-changing operator calls, newest first (any operator)",
        (Answer(200, "a page of entries", a.AuditPage), _ADMIN, _LIST_QUERY),
        security="admin",
        query_struct=AuditQuery,
        tags=("operators",),
    ),
    Operation(
        "post",
        "/auth/dev-login",
        "A session without WeChat (only where DEV_LOGIN=1)",
        (Answer(200, "logged in; the cookie is set", a.LoggedIn), *_BODY, _PLAYER_POST),
        request=DevLogin,
        tags=("sessions",),
    ),
    Operation(
        "post",
        "/auth/logout",
        "Delete the session and its cookie",
        (
            Answer(200, "logged out", a.LoggedOut),
            Answer(400, "more than one session cookie", errors=("bad_request",)),
            _PLAYER_POST,
        ),
        tags=("sessions",),
    ),
    Operation(
        "get",
        "/auth/wechat/login",
        "Start a WeChat login: to WeChat's authorize page, then back to next",
        (
            _REDIRECT,
            Answer(503, "WeChat login is not configured", _HTML_PAGE, media=HTML),
        ),
        query=("next",),
        tags=("sessions",),
    ),
    Operation(
        "get",
        "/auth/wechat/callback",
        "WeChat's redirect back: set the session, then to next (login=denied if refused)",
        (
            _REDIRECT,
            Answer(400, "stale state or code (the page says why)", _HTML_PAGE, media=HTML),
            Answer(502, "WeChat answered an error", _HTML_PAGE, media=HTML),
            Answer(503, "WeChat is unreachable or not configured", _HTML_PAGE, media=HTML),
        ),
        query=("code", "state"),
        tags=("sessions",),
    ),
    Operation(
        "get",
        "/",
        "The H5 page",
        (
            Answer(200, "the page", _HTML_PAGE, media=HTML),
            Answer(304, "not modified", media=""),
        ),
        tags=("page",),
    ),
    Operation(
        "get",
        "/c/{id}",
        "The H5 page of a campaign (it reads the id from its path)",
        (
            Answer(200, "the page", _HTML_PAGE, media=HTML),
            Answer(304, "not modified", media=""),
        ),
        tags=("page",),
    ),
    Operation(
        "get",
        "/admin",
        "The operators' console (its data comes from /api/admin with a bearer token)",
        (
            Answer(200, "the page", _HTML_PAGE, media=HTML),
            Answer(304, "not modified", media=""),
        ),
        tags=("operators",),
    ),
    Operation(
        "get",
        "/static/{name}",
        "A content-hashed asset of the page, cached for a year",
        (
            Answer(200, "a stylesheet", {"type": "string"}, media="text/css"),
            Answer(200, "a script", {"type": "string"}, media="text/javascript"),
            Answer(304, "not modified", media=""),
            Answer(404, "no such asset", errors=("not_found",)),
        ),
        tags=("page",),
    ),
    Operation(
        "get",
        "/favicon.ico",
        "The icon browsers show in tabs and bookmarks",
        (
            Answer(200, "the icon", {"type": "string"}, media="image/x-icon"),
            Answer(304, "not modified", media=""),
        ),
        tags=("page",),
    ),
    Operation(
        "get",
        "/healthz",
        "Liveness: the process answers (no store consulted)",
        (Answer(200, "alive", a.Health),),
        tags=("ops",),
    ),
    Operation(
        "get",
        "/healthz/ledger",
        "Whether PostgreSQL (the ledger) answers; never part of readiness",
        (Answer(200, "up", a.LedgerHealth), Answer(503, "down", a.LedgerHealth)),
        tags=("ops",),
    ),
    Operation(
        "get",
        "/readyz",
        "Readiness: not draining, Redis answers, scripts loaded",
        (Answer(200, "ready", a.Readiness), Answer(503, "not ready", a.Readiness)),
        tags=("ops",),
    ),
    Operation(
        "get",
        "/metrics",
        "This worker's metrics, Prometheus text format (not served through HAProxy)",
        (
            Answer(200, "the metrics", {"type": "string"}, media="text/plain"),
            Answer(404, "asked through HAProxy's public frontend", errors=("not_found",)),
        ),
        tags=("ops",),
    ),
    Operation(
        "get",
        PATH,
        "This document",
        (Answer(200, "the OpenAPI 3.1 document", {"type": "object"}),),
        tags=("ops",),
    ),
)


def _structs(body: Body) -> Iterator[type[msgspec.Struct]]:
    if isinstance(body, tuple):
        yield from body
    elif isinstance(body, type):
        yield body


def _schema(body: Body) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    refs = [{"$ref": f"{SCHEMAS}{struct.__name__}"} for struct in _structs(body)]
    return refs[0] if len(refs) == 1 else {"anyOf": refs}


def _error_schema(codes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "allOf": [{"$ref": f"{SCHEMAS}Error"}],
        "properties": {"error": {"enum": list(codes)}},
    }


def _responses(op: Operation) -> dict[str, Any]:
    by_status: dict[int, list[Answer]] = {}
    writes = op.security == "admin" and op.method != "get"
    for answer in (*op.answers, *((_VIEWER,) if writes else ()), *_ANYWHERE):
        by_status.setdefault(answer.status, []).append(answer)
    responses: dict[str, Any] = {}
    for status, group in sorted(by_status.items()):
        response: dict[str, Any] = {"description": "; ".join(g.description for g in group)}
        media: dict[str, list[dict[str, Any]]] = {}
        codes = tuple(code for answer in group for code in answer.errors)
        if codes:
            media[JSON] = [_error_schema(codes)]
        for answer in group:
            if answer.media and not answer.errors:
                media.setdefault(answer.media, []).append(_schema(answer.body))
            for name in answer.headers:
                response.setdefault("headers", {})[name] = {
                    "required": True,
                    "schema": {"type": "string"},
                }
        if media:
            response["content"] = {
                name: {"schema": schemas[0] if len(schemas) == 1 else {"anyOf": schemas}}
                for name, schemas in media.items()
            }
        responses[str(status)] = response
    return responses


def _operation(op: Operation, operation_id: str) -> dict[str, Any]:
    parameters = [_campaign_id()] if "{id}" in op.path else []
    if "{name}" in op.path:
        parameters.append(
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
        for name in op.query
    ]
    parameters += _query_parameters(op.query_struct)
    parameters += op.headers
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": operation_id,
        "tags": list(op.tags),
        "responses": _responses(op),
    }
    if parameters:
        doc["parameters"] = parameters
    if op.request is not None:
        doc["requestBody"] = {"required": True, "content": {JSON: {"schema": _request(op)}}}
    if op.security is not None:
        doc["security"] = [{op.security: []}]
    return doc


def _query_parameters(struct: type[msgspec.Struct] | None) -> list[dict[str, Any]]:
    """One optional query parameter per field of ``struct``, with its JSON Schema."""
    if struct is None:
        return []
    (ref,), components = msgspec.json.schema_components([struct])
    fields = components[ref["$ref"].rpartition("/")[2]]["properties"]
    return [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in fields.items()
    ]


def _request(op: Operation) -> dict[str, Any]:
    schema = _schema(op.request)
    structs = list(_structs(op.request))
    if len(structs) > 1:
        # Tagged structs: the discriminator names each kind's schema.
        tag_field = structs[0].__struct_config__.tag_field
        schema["discriminator"] = {
            "propertyName": tag_field,
            "mapping": {s.__struct_config__.tag: f"{SCHEMAS}{s.__name__}" for s in structs},
        }
    return schema


def registered(app: web.Application) -> dict[tuple[str, str], str]:
    """(method, path template) -> name of every route the app serves (HEAD goes with GET)."""
    return {
        (route.method.lower(), route.resource.canonical): route.name or route.resource.canonical
        for route in app.router.routes()
        if route.resource is not None and route.method not in {"HEAD", "*"}
    }


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes ``app`` serves."""
    served = registered(app)
    operations = [op for op in OPERATIONS if (op.method, op.path) in served]
    structs: list[type[msgspec.Struct]] = [a.Error]
    for op in operations:
        structs += _structs(op.request)
        for answer in op.answers:
            structs += _structs(answer.body)
    _, components = msgspec.json.schema_components(
        list(dict.fromkeys(structs)), ref_template=SCHEMAS + "{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op, served[op.method, op.path])
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Red packets (红包) and lotteries (抽奖). Amounts are integer fen. "
            "Every error is JSON {error, message} (the WeChat login's browser navigations "
            "answer HTML pages); answers may gain fields, requests may not.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "ADMIN_TOKEN (the bootstrap admin) or a named operator's "
                    "token (hb operator add): role admin, or viewer for GETs only",
                },
                "session": {"type": "apiKey", "in": "cookie", "name": "hb_session"},
            },
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    """GET /api/openapi.json: the document, made once per worker, public and cacheable."""
    return web.Response(
        body=request.app[OPENAPI],
        content_type=JSON,
        headers={"Cache-Control": CACHE_CONTROL},
    )


async def _build(app: web.Application) -> None:
    app[OPENAPI] = orjson.dumps(document(app))


def setup(app: web.Application) -> None:
    """Register the document's route; it is built once the routes are all in place."""
    app.router.add_get(PATH, openapi_json, name="openapi")
    app.on_startup.append(_build)
