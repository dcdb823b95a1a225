"""Player API."""

from __future__ import annotations

import re

from aiohttp import web

from app.errors import Invalid, QuotaExhausted, json_response
from app.store.scripts import GrabCode
from app.web.accesslog import routine_json
from app.web.handlers.deps import (
    confirmed_session,
    current_session,
    playing_claims,
    playing_session,
)
from app.web.keys import CAMPAIGNS, METRICS, PAYOUTS

# A UUID fits, and so does any other client's token of this alphabet; no braces, so the
# key stays inside the campaign's hash tag.
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")

_SOLD_OUT = {"result": "sold_out"}
_RESULTS = {
    GrabCode.WON: "won",
    GrabCode.ALREADY_WON: "already_won",
}


async def get_campaign(request: web.Request) -> web.Response:
    """GET /api/campaigns/{id}: public state, no session needed."""
    view = await request.app[CAMPAIGNS].public_view(request.match_info["id"])
    return json_response(view)


async def grab(request: web.Request) -> web.Response:
    """POST /api/campaigns/{id}/grab: one envelope per player, settled in Redis."""
    app = request.app  # read once: each read walks the match info
    campaigns, campaign_id = app[CAMPAIGNS], request.match_info["id"]
    # 404 / 409 need no session: answered from the cached definition, before Redis.
    campaign = await campaigns.ensure_open(campaign_id)
    claims = await playing_claims(request)
    # Sold out, known here, to a player who won nothing: an answer that settles and
    # reveals nothing needs no Redis, not even to confirm the session. Measured to pay
    # (docs/benchmarks.md): the session's MGET was about a tenth of a sold-out grab's
    # worker CPU.
    if not campaigns.surely_sold_out(campaign, claims.session.openid):
        session = await confirmed_session(request, claims)
        outcome = await campaigns.grab(campaign, session.openid)
        if outcome.code is not GrabCode.SOLD_OUT:
            result = _RESULTS[outcome.code]
            app[METRICS].count_grab(result)
            body = {"result": result, "amount_fen": outcome.amount_fen}
            return json_response(body) if outcome.code is GrabCode.WON else routine_json(body)
    app[METRICS].count_grab("sold_out")
    return routine_json(_SOLD_OUT)


async def my_result(request: web.Request) -> web.Response:
    """GET /api/campaigns/{id}/me: what this player has won."""
    session = await current_session(request)
    view = await request.app[CAMPAIGNS].my_view(request.match_info["id"], session.openid)
    return json_response(view)


async def claim(request: web.Request) -> web.Response:
    """POST /api/campaigns/{id}/claim: what the page needs to open the confirmation of
    the player's transfer to 零钱 (package_info, mch id, app id)."""
    campaign = await request.app[CAMPAIGNS].get(request.match_info["id"])
    session = await playing_session(request)
    return json_response(await request.app[PAYOUTS].claim(campaign.id, session.openid))


def idempotency_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key header, if any (422 when malformed)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and IDEMPOTENCY_KEY.fullmatch(key) is None:
        raise Invalid("Idempotency-Key", "Idempotency-Key must be 1 to 64 of A-Z a-z 0-9 _ -")
    return key


async def draw(request: web.Request) -> web.Response:
    """POST /api/campaigns/{id}/draw: one lottery draw, settled in Redis; a retry under the
    same Idempotency-Key answers the same draw."""
    app = request.app
    campaigns, campaign_id = app[CAMPAIGNS], request.match_info["id"]
    key = idempotency_key(request)
    # As for grabs, 404 / 409 need no session.
    campaign = await campaigns.ensure_open(campaign_id)
    session = await playing_session(request)
    metrics = app[METRICS]
    try:
        outcome = await campaigns.draw(campaign, session.openid, key)
    except QuotaExhausted:
        metrics.count_draw(QuotaExhausted.code)
        raise
    body = outcome.to_json()
    metrics.count_draw(body["result"])
    return json_response(body)


def setup(app: web.Application) -> None:
    """Register player routes."""
    # The router tries the routes under /api/campaigns in this order (each miss is a
    # regex match): the hot ones first.
    app.router.add_post("/api/campaigns/{id}/grab", grab, name="grab")
    app.router.add_post("/api/campaigns/{id}/draw", draw, name="draw")
    app.router.add_get("/api/campaigns/{id}", get_campaign, name="campaign")
    app.router.add_get("/api/campaigns/{id}/me", my_result, name="me")
    app.router.add_post("/api/campaigns/{id}/claim", claim, name="claim")
