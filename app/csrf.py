"""Same-origin check for state-changing player requests (CSRF).

Players authenticate with a cookie, which a browser also sends on a form posted from
another site. A POST (or other unsafe method) to a player route therefore needs proof
it came from our page: an ``Origin`` (or, lacking one, ``Referer``) of our own origin,
or the header our page sets (``X-Requested-With: hongbao``), which another site's
page cannot send without a CORS preflight that we never grant. A foreign Origin is
refused even with the header. Operator routes use a bearer token, not cookies, and
are exempt; so are unknown routes (they answer 404 or 405).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from app.errors import json_response
from app.keys import SETTINGS

PAGE_HEADER = "X-Requested-With"
PAGE_HEADER_VALUE = "hongbao"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_EXEMPT_PREFIXES = ("/api/admin/",)


def public_origin(request: web.Request) -> str:
    """Our origin: PUBLIC_BASE_URL, else the scheme and Host of this request."""
    configured = request.app[SETTINGS].public_base_url
    return configured or f"{request.scheme}://{request.host}"


def _origin_of(url: str) -> str | None:
    try:
        parsed = URL(url)
    except ValueError:
        return None
    if not parsed.is_absolute() or parsed.scheme not in {"http", "https"}:
        return None
    return str(parsed.origin())


def same_origin(request: web.Request) -> bool:
    """Whether an unsafe request demonstrably comes from our own pages."""
    ours = _origin_of(public_origin(request))
    origin = request.headers.get("Origin")
    if origin is not None:
        return _origin_of(origin) == ours
    if request.headers.get(PAGE_HEADER) == PAGE_HEADER_VALUE:
        return True
    referer = request.headers.get("Referer")
    return referer is not None and _origin_of(referer) == ours


@web.middleware
async def csrf_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 {"error": "csrf"} for a cross-site unsafe request to a player route."""
    if (
        request.method not in _SAFE_METHODS
        and request.match_info.http_exception is None
        and not request.path.startswith(_EXEMPT_PREFIXES)
        and not same_origin(request)
    ):
        return json_response(
            {"error": "csrf", "message": "cross-site request refused; use the campaign page"},
            status=403,
        )
    return await handler(request)
