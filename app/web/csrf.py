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

import functools

from aiohttp import web
from yarl import URL

from app.web.keys import SETTINGS

PAGE_HEADER = "X-Requested-With"
PAGE_HEADER_VALUE = "hongbao"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# WeChat Pay's notifications carry its signature instead of a cookie.
_EXEMPT_PREFIXES = ("/api/admin/", "/api/wechatpay/")


def public_origin(request: web.Request) -> str:
    """Our origin: PUBLIC_BASE_URL, else the scheme and Host of this request."""
    configured = request.app[SETTINGS].public_base_url
    return configured or f"{request.scheme}://{request.host}"


# Parsing a URL costs more than the rest of the check: the few origins a worker sees
# (its own, and the odd foreign one) are parsed once each.
@functools.lru_cache(maxsize=1024)
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


def configured_origin(public_base_url: str) -> str | None:
    """The origin of PUBLIC_BASE_URL, once (None when unset or not http(s))."""
    return _origin_of(public_base_url) if public_base_url else None


def csrf_refused(request: web.Request, ours: str | None) -> bool:
    """Whether ``request`` is a cross-site unsafe request to a player route (403 csrf).

    ``ours`` is configured_origin(): a request from our own page (the browser sends our
    origin, exactly) passes at once, before the route and header checks.
    """
    if request.method in _SAFE_METHODS:
        return False
    if ours is not None and request.headers.get("Origin") == ours:
        return False
    return (
        request.match_info.http_exception is None
        and not request.path.startswith(_EXEMPT_PREFIXES)
        and not same_origin(request)
    )
