"""What several handlers need from a request: the session, the admin check (the
operator app.web.operators found: every admin handler calls ``require_admin``)."""

from __future__ import annotations

from aiohttp import web

from app.errors import ApiError, Forbidden, Unauthenticated
from app.identity.sessions import COOKIE_NAME, Claims, Session
from app.web.keys import OPENID, SESSIONS, SETTINGS
from app.web.operators import require_admin

UNKNOWN_SESSION = "session unknown or expired; log in again"

__all__ = [
    "confirmed_session",
    "current_session",
    "playing_claims",
    "playing_session",
    "require_admin",
    "session_token",
    "set_session_cookie",
]


def session_token(request: web.Request) -> str | None:
    """The session cookie's value, or None; 400 if the request carries more than one.

    Our tokens never need quoting, so the Cookie header is scanned for the one cookie
    we want (``request.cookies`` parses every cookie into a Morsel first: a tenth of a
    sold-out grab's CPU). One identity per request: with two session cookies HAProxy's
    per-session rate limit and this worker could read different ones.
    """
    token: str | None = None
    for header in request.headers.getall("Cookie", ()):
        for part in header.split(";"):
            name, eq, value = part.strip().partition("=")
            if eq and name == COOKIE_NAME:
                if token is not None:
                    raise ApiError("more than one session cookie")
                token = value
    return token


def _token(request: web.Request) -> str:
    token = session_token(request)
    if token is None:
        raise Unauthenticated("log in first")
    return token


def _found(request: web.Request, session: Session | None) -> Session:
    if session is None:
        raise Unauthenticated(UNKNOWN_SESSION)
    request[OPENID] = session.openid
    return session


async def current_session(request: web.Request) -> Session:
    """The caller's session, or 401 unauthenticated."""
    return _found(request, await request.app[SESSIONS].get(_token(request)))


async def playing_session(request: web.Request) -> Session:
    """A session allowed to grab or draw (not a WeChat snapshot-page visitor)."""
    # The store is awaited here, not through current_session: a coroutine layer fewer
    # on the hot path.
    return _playing(_found(request, await request.app[SESSIONS].get(_token(request))))


async def playing_claims(request: web.Request) -> Claims:
    """The claims of a token allowed to grab or draw (401 / 403 as playing_session),
    its session not yet confirmed in Redis: enough for an answer that settles and
    reveals nothing (a grab of a pool known sold out); anything else first awaits
    ``confirmed_session``."""
    claims = await request.app[SESSIONS].signed(_token(request))
    if claims is None:
        raise Unauthenticated(UNKNOWN_SESSION)
    if claims.session.snapshot:
        # 401 before 403, as playing_session: a visitor's ended session is unknown.
        await confirmed_session(request, claims)
    _playing(_found(request, claims.session))
    return claims


async def confirmed_session(request: web.Request, claims: Claims) -> Session:
    """The session of ``playing_claims``'s answer, once Redis shows it exists (401 if not,
    and the access line then names no user)."""
    if not await request.app[SESSIONS].confirm(claims):
        request.pop(OPENID, None)
        raise Unauthenticated(UNKNOWN_SESSION)
    return claims.session


def _playing(session: Session) -> Session:
    if session.snapshot:
        raise Forbidden(
            "open the page in WeChat and authorise to take part", reason="snapshot_user"
        )
    return session


def set_session_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    """Attach the session cookie: HttpOnly, SameSite=Lax, Secure unless configured off."""
    settings = request.app[SETTINGS]
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=settings.session_ttl_s,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=not settings.insecure_cookies,
    )
