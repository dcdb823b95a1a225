"""Session endpoints: logout, and dev-login when DEV_LOGIN=1."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web

from app.errors import Invalid, json_response
from app.identity.sessions import COOKIE_NAME, Session
from app.validation import convert, read_json_object
from app.web.handlers.deps import session_token, set_session_cookie
from app.web.keys import SESSIONS, SETTINGS

MAX_OPENID_LEN = 64


class DevLogin(msgspec.Struct, forbid_unknown_fields=True):
    """Log in as ``openid`` (printable, no spaces inside; surrounding spaces are dropped)."""

    openid: Annotated[
        str, msgspec.Meta(max_length=MAX_OPENID_LEN, pattern=r"^\s*[^\s\x00-\x1f\x7f]+\s*$")
    ]


async def dev_login(request: web.Request) -> web.Response:
    """POST /auth/dev-login {"openid"}: a session without WeChat (local runs only)."""
    openid = convert(await read_json_object(request), DevLogin).openid.strip()
    if not openid.isprintable():
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
