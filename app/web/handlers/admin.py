"""Operator API (Bearer token of an operator: app.web.operators)."""

from __future__ import annotations

from aiohttp import web

from app.errors import json_response
from app.validation import read_json_object
from app.web.handlers.deps import require_admin
from app.web.keys import AUDITED_CAMPAIGN, CAMPAIGNS


async def create_campaign(request: web.Request) -> web.Response:
    """POST /api/admin/campaigns."""
    require_admin(request)
    data = await read_json_object(request)
    campaigns = request.app[CAMPAIGNS]
    campaign = await campaigns.create(data)
    request[AUDITED_CAMPAIGN] = campaign.id
    return json_response(await campaigns.stats(campaign.id), status=201)


async def campaign_stats(request: web.Request) -> web.Response:
    """GET /api/admin/campaigns/{id}: live statistics."""
    require_admin(request)
    return json_response(await request.app[CAMPAIGNS].stats(request.match_info["id"]))


async def end_campaign(request: web.Request) -> web.Response:
    """POST /api/admin/campaigns/{id}/end: end now and close out; its statistics."""
    require_admin(request)
    return json_response(await request.app[CAMPAIGNS].end(request.match_info["id"]))


async def pause_campaign(request: web.Request) -> web.Response:
    """POST /api/admin/campaigns/{id}/pause: no grab or draw until resumed."""
    require_admin(request)
    return json_response(await request.app[CAMPAIGNS].pause(request.match_info["id"], True))


async def resume_campaign(request: web.Request) -> web.Response:
    """POST /api/admin/campaigns/{id}/resume: grabs and draws again."""
    require_admin(request)
    return json_response(await request.app[CAMPAIGNS].pause(request.match_info["id"], False))


def setup(app: web.Application) -> None:
    """Register operator routes."""
    app.router.add_post("/api/admin/campaigns", create_campaign, name="admin_create")
    app.router.add_get("/api/admin/campaigns/{id}", campaign_stats, name="admin_stats")
    app.router.add_post("/api/admin/campaigns/{id}/end", end_campaign, name="admin_end")
    app.router.add_post("/api/admin/campaigns/{id}/pause", pause_campaign, name="admin_pause")
    app.router.add_post("/api/admin/campaigns/{id}/resume", resume_campaign, name="admin_resume")
