"""The public results of a campaign (no session needed): GET /api/campaigns/{id}/results."""

from __future__ import annotations

from aiohttp import web

from app.web.keys import RESULTS


async def results(request: web.Request) -> web.Response:
    """GET /api/campaigns/{id}/results: 手气最佳 and the winners once a red packet has
    given out (409 not_finished before), a lottery's prizes at any time; cacheable."""
    published = await request.app[RESULTS].get(request.match_info["id"])
    return web.Response(
        body=published.body,
        status=published.status,
        content_type="application/json",
        headers={"Cache-Control": published.cache_control},
    )


def setup(app: web.Application) -> None:
    """Register the results route."""
    app.router.add_get("/api/campaigns/{id}/results", results, name="results")
