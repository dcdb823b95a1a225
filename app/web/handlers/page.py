"""The H5 page players open, the operators' console, and their static assets."""

from __future__ import annotations

from aiohttp import web

from app.errors import NotFound
from app.web.assets import Asset
from app.web.keys import ASSETS

ASSET_CACHE = "public, max-age=31536000, immutable"
# The favicon's name is fixed (browsers ask for /favicon.ico), so a day, not forever.
FAVICON_CACHE = "public, max-age=86400"
# A sandboxed page: only our own scripts, styles and API; no framing by other sites.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _send(request: web.Request, asset: Asset, cache_control: str) -> web.Response:
    headers = {"Cache-Control": cache_control, "ETag": asset.etag, "Vary": "Accept-Encoding"}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    body = asset.body
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    response = web.Response(body=body, headers=headers)
    response.content_type = asset.content_type
    if asset.content_type.startswith("text/"):
        response.charset = "utf-8"
    return response


def _page(request: web.Request, asset: Asset) -> web.Response:
    response = _send(request, asset, "no-cache")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


async def h5_page(request: web.Request) -> web.Response:
    """GET / and GET /c/{id}: the page; it reads the campaign id from its path."""
    return _page(request, request.app[ASSETS].page)


async def admin_console(request: web.Request) -> web.Response:
    """GET /admin: the operators' console; its data comes from /api/admin with a token."""
    return _page(request, request.app[ASSETS].admin)


async def static_asset(request: web.Request) -> web.Response:
    """GET /static/{name}: a content-hashed asset, cached for a year."""
    asset = request.app[ASSETS].files.get(request.match_info["name"])
    if asset is None:
        raise NotFound("no such asset")
    response = _send(request, asset, ASSET_CACHE)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def favicon(request: web.Request) -> web.Response:
    """GET /favicon.ico: the red-packet icon browsers show in tabs and bookmarks."""
    return _send(request, request.app[ASSETS].favicon, FAVICON_CACHE)


def setup(app: web.Application) -> None:
    """Register the page routes."""
    app.router.add_get("/", h5_page, name="home")
    app.router.add_get("/c/{id}", h5_page, name="campaign_page")
    app.router.add_get("/admin", admin_console, name="admin_console")
    app.router.add_get("/static/{name}", static_asset, name="static")
    app.router.add_get("/favicon.ico", favicon, name="favicon")
