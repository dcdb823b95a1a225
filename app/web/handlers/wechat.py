"""WeChat login routes: /auth/wechat/login and /auth/wechat/callback.

Both are browser navigations, so failures are small HTML pages in Chinese (with the
reason in ``data-error``), never JSON and never a 500.
"""

from __future__ import annotations

import html
import re
from urllib.parse import quote

from aiohttp import web
from yarl import URL

from app.errors import ApiError
from app.identity.login import (
    LOGIN_TTL_S,
    LoginFailed,
    browser_cookie_ok,
    new_browser_cookie,
    safe_next,
)
from app.web.csrf import public_origin
from app.web.handlers.deps import set_session_cookie
from app.web.keys import LOGINS, SETTINGS

LOGIN_COOKIE = "hb_login"
CALLBACK_PATH = "/auth/wechat/callback"
# What may go into WeChat's redirect_uri and our Location header: an origin made of a
# host name, IPv4 or [IPv6] literal and a port (a Host header may hold any bytes).
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")

# reason -> (HTTP status, what the player reads)
_FAILURES: dict[str, tuple[int, str]] = {
    "bad_state": (400, "登录链接已失效或已过期，请回到活动页重新登录。"),
    "invalid_code": (400, "微信授权码无效或已过期，请重新登录。"),
    "code_used": (400, "这次授权已经用过了，请重新登录。"),
    "wechat_error": (502, "微信登录暂时出了问题，请稍后再试。"),
    "unavailable": (503, "暂时连不上微信，请稍后刷新重试。"),
    "busy": (503, "登录还在处理中，请稍后刷新本页。"),
    "not_configured": (503, "本服务还没有配置微信登录。"),
}

_PAGE = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>登录没有完成</title>
<style>body{{margin:0;font-family:-apple-system,"PingFang SC","Noto Sans CJK SC",sans-serif;
background:#2b0b0b;color:#fbe3b4;display:flex;min-height:100vh;align-items:center;
justify-content:center;text-align:center}}main{{padding:32px 24px;max-width:320px}}
h1{{font-size:20px;margin:0 0 12px}}p{{line-height:1.6;margin:0 0 24px}}
a{{display:block;margin:12px 0;padding:12px;border-radius:24px;background:#e8b765;color:#3d2a12;
text-decoration:none}}a.plain{{background:none;color:#f0c9a0;text-decoration:underline}}</style>
</head><body data-error="{reason}"><main><h1>登录没有完成</h1><p>{message}{detail}</p>
<a href="{retry}">重新登录</a><a class="plain" href="{back}">返回活动页</a></main></body></html>
"""


def _login_url(next_path: str) -> str:
    return f"/auth/wechat/login?next={quote(next_path, safe='/')}"


def failure_page(reason: str, next_path: str = "/", errcode: int | None = None) -> web.Response:
    """The page shown when a login cannot finish."""
    status, message = _FAILURES[reason]
    detail = f"（错误码 {errcode}）" if errcode is not None else ""
    body = _PAGE.format(
        reason=html.escape(reason),
        message=html.escape(message),
        detail=html.escape(detail),
        retry=html.escape(_login_url(next_path)),
        back=html.escape(next_path),
    )
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


async def login(request: web.Request) -> web.Response:
    """GET /auth/wechat/login?next=/c/<id>: send the browser to WeChat's authorize page."""
    logins = request.app[LOGINS]
    next_path = safe_next(request.query.get("next"))
    if not logins.wechat.configured:
        return failure_page("not_configured", next_path)
    cookie = request.cookies.get(LOGIN_COOKIE)
    if cookie is None or not browser_cookie_ok(cookie):
        cookie = new_browser_cookie()
    origin = public_origin(request)
    if not _ORIGIN.fullmatch(origin):
        raise ApiError("the Host header is not a host name")
    state = await logins.start(next_path, cookie)
    redirect_uri = origin + CALLBACK_PATH
    response = _redirect(logins.wechat.authorize_url(redirect_uri, state))
    response.set_cookie(
        LOGIN_COOKIE,
        cookie,
        max_age=LOGIN_TTL_S,
        path="/auth/wechat",
        httponly=True,
        samesite="Lax",
        secure=not request.app[SETTINGS].insecure_cookies,
    )
    return response


async def callback(request: web.Request) -> web.Response:
    """GET /auth/wechat/callback?code&state: finish the login and go back to the page."""
    logins = request.app[LOGINS]
    state = request.query.get("state", "")
    code = request.query.get("code")
    cookie = request.cookies.get(LOGIN_COOKIE)
    if not code:
        # The player refused (or WeChat sent no code): back to the page, which says so.
        next_path = await logins.abandon(state, cookie)
        return _redirect(str(URL(next_path) % {"login": "denied"}))
    try:
        done = await logins.finish(state, code, cookie)
    except LoginFailed as exc:
        return failure_page(exc.reason, exc.next, exc.errcode)
    response = _redirect(done.next)
    set_session_cookie(request, response, done.token)
    return response


def setup(app: web.Application) -> None:
    """Register the WeChat login routes."""
    app.router.add_get("/auth/wechat/login", login, name="wechat_login")
    app.router.add_get(CALLBACK_PATH, callback, name="wechat_callback")
