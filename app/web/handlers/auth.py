"""Session endpoints: logout, and dev-login when DEV_LOGIN=1."""

from __future__ import annotations

from aiohttp import web

from app.errors import Invalid, json_response
from app.identity.sessions import COOKIE_NAME, Session
from app.validation import get_str, read_json_object, reject_unknown
from app.web.handlers.deps import session_token, set_session_cookie
from app.web.keys import SESSIONS, SETTINGS

MAX_OPENID_LEN = 64


async def dev_login(request: web.Request) -> web.Response:
    """POST /auth/dev-login {"openid"}: a session without WeChat (local runs only)."""
    data = await read_json_object(request)
    reject_unknown(data, {"openid"})
    openid = get_str(data, "openid", max_len=MAX_OPENID_LEN)
    if not openid.isprintable() or " " in openid:
        raise Invalid("openid", "openid must be printable without spaces")
    token = await request.app[SESSIONS].create(Session(openid))
    response = json_response({"openid": openid})
    set_session_cookie(request, response, token)
    return response


async def logout(request: web.Request) -> web.Response:
    """POST /auth/logout: delete the session and the cookie."""
    token = session_token(request)
    if token is not None:
        await request.app[SESSIONS].delete(token)
    response = json_response({"result": "logged_out"})
    response.del_cookie(COOKIE_NAME, path="/")
    return response


def setup(app: web.Application) -> None:
    """Register session routes; dev-login only exists when enabled."""
    app.router.add_post("/auth/logout", logout, name="logout")
    if app[SETTINGS].dev_login:
        app.router.add_post("/auth/dev-login", dev_login, name="dev_login")
