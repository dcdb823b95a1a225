"""The hot routes, matched below aiohttp's ``Application`` layer.

The worker's server (app.web.lifecycle) hands every request to ``HotRoutes``: a POST to
``/api/campaigns/{id}/grab`` or ``/api/campaigns/{id}/draw`` (their 409s on a closed
window included) goes straight to the edge middleware and the route's own handler;
everything else goes to the ``Application`` as before. This replaces, for those two
routes, what ``Application._handle`` does per request: the router's walk (a coroutine
per resource tried, a regex), the middleware chain looked up in an LRU cache and called
through a ``functools.partial``. Hand-written because it was measured to pay
(``python -m bench.instructions``, docs/benchmarks.md): about 24,000 instructions a
request fewer on every hot path (sold out 265.0k -> 241.4k, ended 253.9k -> 230.0k,
won 311.7k -> 286.8k, draw 342.8k -> 312.0k).

What the hot path keeps, so a handler cannot tell the difference: the same ``Request``
(made by the Application's request factory: ``client_max_size`` holds), the route's
own ``UrlMappingMatchInfo`` (``match_info["id"]``, ``match_info.route``, ``request.app``),
the same edge middleware (request id, CSRF, JSON errors, metrics, access log) and
handler. A path the router would match differently goes to the Application: an id with
a ``%`` (the router unquotes ``%2F`` and ``%25``), an empty one, anything after the
action, another method (405), and a request with ``Expect`` (the route's expect handler).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import AbstractRoute, UrlMappingMatchInfo

PREFIX = "/api/campaigns/"
# The route names app.web.handlers.h5 registers, each at PREFIX + "{id}/" + its name.
ACTIONS = ("grab", "draw")
# What the router's default {id} pattern ([^{}/]+) refuses, and "%" (see above).
_NOT_PLAIN = frozenset("{}%")

# Match infos remembered, by path: a campaign's players all ask the same two paths. Only
# for ids this long at most (ours are 16 characters), so what is remembered stays small
# whatever paths a client makes up.
MAX_MATCHES = 4096
MAX_REMEMBERED_ID = 64

# What aiohttp's low-level server calls with each request.
LowLevelHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class HotRoutes:
    """The worker's request handler: the hot routes matched here, the rest by ``app``."""

    def __init__(self, app: web.Application, fallback: LowLevelHandler) -> None:
        middlewares = tuple(app.middlewares)
        if len(middlewares) != 1:
            raise RuntimeError("HotRoutes expects one middleware, the edge")
        self._app = app
        self._edge = middlewares[0]
        self._fallback = fallback
        self._routes: dict[str, AbstractRoute] = {}
        self._matches: dict[str, UrlMappingMatchInfo] = {}
        for action in ACTIONS:
            resource = app.router[action]
            if resource.canonical != f"{PREFIX}{{id}}/{action}":
                raise RuntimeError(f"route {action} is at {resource.canonical}")
            (route,) = resource
            if route.method != hdrs.METH_POST:
                raise RuntimeError(f"route {action} answers {route.method}")
            self._routes[action] = route

    async def __call__(self, base: web.BaseRequest) -> web.StreamResponse:
        request = cast(web.Request, base)  # the Application's request factory made it
        if request.method == hdrs.METH_POST and hdrs.EXPECT not in request.headers:
            path = request.rel_url.path_safe
            match_info = self._matches.get(path)
            if match_info is None and path.startswith(PREFIX):
                match_info = self._match(path)
            if match_info is not None:
                request._match_info = match_info
                return await self._edge(request, match_info.handler)
        return await self._fallback(request)

    def _match(self, path: str) -> UrlMappingMatchInfo | None:
        """The match info of a hot route's ``path`` (remembered), or None."""
        campaign_id, slash, action = path[len(PREFIX) :].partition("/")
        route = self._routes.get(action) if slash else None
        if route is None or not campaign_id or not _NOT_PLAIN.isdisjoint(campaign_id):
            return None
        # One match info per path, shared by the requests that ask it: frozen (no app
        # is added), its dict never written. Remembered because it was measured to pay:
        # parsing the path and making a match info per request cost ~11,000
        # instructions (python -m bench.instructions: sold out 241.4k -> 230.2k, ended
        # 230.0k -> 218.7k, draw 312.0k -> 294.1k).
        match_info = UrlMappingMatchInfo({"id": campaign_id}, route)
        match_info.add_app(self._app)
        match_info.freeze()
        if len(campaign_id) <= MAX_REMEMBERED_ID:
            if len(self._matches) >= MAX_MATCHES:
                self._matches.clear()
            self._matches[path] = match_info
        return match_info
