"""A fake WeChat for local runs and tests, speaking WeChat's web-authorization wire format.

- ``GET /connect/oauth2/authorize?appid&redirect_uri&response_type=code&scope&state``
  shows a consent page (同意 / 拒绝, with the openid to log in as) and redirects to
  ``redirect_uri?code=CODE&state=STATE``, or ``redirect_uri?state=STATE`` on refusal.
  For automation, ``&fake_openid=ID`` approves at once (``&fake_snapshot=1`` makes a
  snapshot-page user, ``&fake_unionid=U`` sets the unionid, ``&fake_nickname=N`` the
  nickname, ``&fake_deny=1`` refuses).
- ``GET /sns/oauth2/access_token?appid&secret&code&grant_type=authorization_code``
  answers ``{access_token, expires_in, refresh_token, openid, scope[, unionid]
  [, is_snapshotuser]}`` or ``{errcode, errmsg}``: 40013 invalid appid, 40125 invalid
  appsecret, 40002 invalid grant_type, 41008 missing code, 40029 invalid code (unknown,
  expired after 5 minutes, or another app's), 40163 code been used.
- ``GET /sns/userinfo?access_token&openid&lang`` (scope snsapi_userinfo) answers
  ``{openid, nickname, sex, province, city, country, headimgurl, privilege[, unionid]}``
  or 40001 invalid credential (unknown access token), 40003 invalid openid, 48001 api
  unauthorized (a snsapi_base token, or a snapshot-page user).

Codes live in this process's memory; the clock is injectable so tests can expire them.
"""

from __future__ import annotations

import html
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web
from yarl import URL

CODE_TTL_S = 300
SCOPES = ("snsapi_base", "snsapi_userinfo")


@dataclass
class Grant:
    """What a code stands for, until it is used or expires."""

    appid: str
    openid: str
    scope: str
    unionid: str | None
    snapshot: bool
    expires_at: float
    used: bool = False
    nickname: str = ""


class FakeWeChat:
    """The fake's state: the one app it knows and the codes it issued."""

    def __init__(
        self, appid: str, secret: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.appid = appid
        self._secret = secret
        self._clock = clock
        self.grants: dict[str, Grant] = {}
        # access token -> the grant it was issued for (kept for the life of the process)
        self.tokens: dict[str, Grant] = {}
        self.exchanges = 0

    def issue(
        self, openid: str, scope: str, unionid: str | None, snapshot: bool, nickname: str = ""
    ) -> str:
        """A one-time code for ``openid``, valid for five minutes."""
        now = self._clock()
        for code in [c for c, g in self.grants.items() if g.expires_at <= now]:
            del self.grants[code]
        code = secrets.token_hex(16)
        if scope == "snsapi_userinfo" and unionid is None:
            unionid = f"u{openid}"
        self.grants[code] = Grant(
            self.appid,
            openid,
            scope,
            unionid if scope == "snsapi_userinfo" else None,
            snapshot,
            now + CODE_TTL_S,
            nickname=nickname or f"玩家{openid[-4:]}",
        )
        return code

    def exchange(self, appid: str, secret: str, code: str, grant_type: str) -> dict[str, object]:
        """The token endpoint's JSON answer."""
        self.exchanges += 1
        if appid != self.appid:
            return _error(40013, "invalid appid")
        if not secrets.compare_digest(secret.encode(), self._secret.encode()):
            return _error(40125, "invalid appsecret")
        if grant_type != "authorization_code":
            return _error(40002, "invalid grant_type")
        if not code:
            return _error(41008, "missing code")
        grant = self.grants.get(code)
        if grant is None or grant.expires_at <= self._clock() or grant.appid != appid:
            return _error(40029, "invalid code")
        if grant.used:
            return _error(40163, "code been used")
        grant.used = True
        access_token = secrets.token_urlsafe(48)
        self.tokens[access_token] = grant
        answer: dict[str, object] = {
            "access_token": access_token,
            "expires_in": 7200,
            "refresh_token": secrets.token_urlsafe(48),
            "openid": grant.openid,
            "scope": grant.scope,
        }
        if grant.unionid is not None:
            answer["unionid"] = grant.unionid
        if grant.snapshot:
            answer["is_snapshotuser"] = 1
        return answer

    def userinfo(self, access_token: str, openid: str) -> dict[str, object]:
        """The userinfo endpoint's JSON answer."""
        grant = self.tokens.get(access_token)
        if grant is None:
            return _error(40001, "invalid credential, access_token is invalid or not latest")
        if openid != grant.openid:
            return _error(40003, "invalid openid")
        if grant.scope != "snsapi_userinfo" or grant.snapshot:
            return _error(48001, "api unauthorized")
        answer: dict[str, object] = {
            "openid": grant.openid,
            "nickname": grant.nickname,
            "sex": 0,
            "province": "",
            "city": "",
            "country": "",
            "headimgurl": "",
            "privilege": [],
        }
        if grant.unionid is not None:
            answer["unionid"] = grant.unionid
        return answer


def _error(errcode: int, errmsg: str) -> dict[str, object]:
    return {"errcode": errcode, "errmsg": f"{errmsg}, rid: {secrets.token_hex(4)}"}


FAKE = web.AppKey("fake_wechat", FakeWeChat)

_CONSENT = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>微信授权（模拟）</title>
<style>body{{margin:0;font-family:-apple-system,"PingFang SC","Noto Sans CJK SC",sans-serif;
background:#ededed;color:#111}}main{{max-width:360px;margin:0 auto;padding:48px 24px}}
.badge{{display:inline-block;font-size:12px;color:#fff;background:#888;border-radius:4px;
padding:2px 6px}}h1{{font-size:20px;margin:16px 0 8px}}p{{color:#555;line-height:1.6}}
label{{display:block;margin:16px 0 6px;font-size:14px;color:#333}}
input[type=text]{{width:100%;box-sizing:border-box;padding:10px;border:1px solid #ccc;
border-radius:6px;font-size:16px}}.check{{display:flex;gap:8px;align-items:center}}
button{{display:block;width:100%;margin-top:16px;padding:13px;border:0;border-radius:8px;
font-size:17px}}.allow{{background:#07c160;color:#fff}}.deny{{background:#fff;color:#111}}
</style></head><body><main><span class="badge">模拟微信 · 仅供本地开发</span>
<h1>网页授权</h1><p>应用 {appid} 申请获取你的{what}。</p>
<form method="get" action="/connect/oauth2/fake-decide">
{hidden}<label for="openid">以此 openid 登录</label>
<input type="text" id="openid" name="fake_openid" value="{openid}" maxlength="64">
{nickname}<label class="check"><input type="checkbox" name="fake_snapshot" value="1">
快照页虚拟用户（只能看，不能抢）</label>
<button class="allow" type="submit" name="decision" value="allow">同意</button>
<button class="deny" type="submit" name="decision" value="deny">拒绝</button>
</form></main></body></html>
"""

_NICKNAME = """<label for="nickname">昵称</label>
<input type="text" id="nickname" name="fake_nickname" value="" maxlength="64"
 placeholder="留空：玩家 + openid 末四位">
"""

_FORWARDED = ("appid", "redirect_uri", "response_type", "scope", "state")


def _error_page(message: str) -> web.Response:
    body = (
        '<!doctype html><meta charset="utf-8"><h1>Oops! Something went wrong:(</h1>'
        f"<p>{html.escape(message)}</p>"
    )
    return web.Response(text=body, status=400, content_type="text/html")


def _back(redirect_uri: str, state: str, code: str | None) -> web.Response:
    query = {"state": state} if code is None else {"code": code, "state": state}
    target = URL(redirect_uri).extend_query(query)
    return web.Response(status=302, headers={"Location": str(target)})


def _check(request: web.Request) -> web.Response | None:
    q = request.query
    if q.get("appid") != request.app[FAKE].appid:
        return _error_page("appid 参数错误")
    if q.get("response_type") != "code":
        return _error_page("response_type 参数错误")
    if q.get("scope") not in SCOPES:
        return _error_page("scope 参数错误或没有 scope 权限")
    redirect = URL(q.get("redirect_uri", ""))
    if not redirect.is_absolute() or redirect.scheme not in {"http", "https"}:
        return _error_page("redirect_uri 参数错误")
    return None


def _decide(request: web.Request, approve: bool) -> web.Response:
    q = request.query
    if not approve:
        return _back(q["redirect_uri"], q.get("state", ""), None)
    openid = q.get("fake_openid", "").strip()[:64] or f"o{secrets.token_hex(8)}"
    code = request.app[FAKE].issue(
        openid,
        q["scope"],
        q.get("fake_unionid") or None,
        q.get("fake_snapshot") == "1",
        q.get("fake_nickname", "").strip()[:64],
    )
    return _back(q["redirect_uri"], q.get("state", ""), code)


async def authorize(request: web.Request) -> web.Response:
    """The authorize page (or an immediate answer when fake_* parameters say so)."""
    problem = _check(request)
    if problem is not None:
        return problem
    q = request.query
    if q.get("fake_deny") == "1":
        return _decide(request, approve=False)
    if q.get("fake_openid"):
        return _decide(request, approve=True)
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(q.get(name, ""))}">'
        for name in _FORWARDED
    )
    userinfo = q["scope"] == "snsapi_userinfo"
    what = "基本信息（昵称、头像）" if userinfo else "身份标识（openid）"
    page = _CONSENT.format(
        appid=html.escape(q["appid"]),
        what=what,
        hidden=hidden,
        openid=f"o{secrets.token_hex(6)}",
        nickname=_NICKNAME if userinfo else "",
    )
    return web.Response(text=page, content_type="text/html")


async def decide(request: web.Request) -> web.Response:
    """The consent form's target: 同意 or 拒绝."""
    problem = _check(request)
    if problem is not None:
        return problem
    return _decide(request, approve=request.query.get("decision") == "allow")


async def access_token(request: web.Request) -> web.Response:
    """The token endpoint: JSON over GET, labelled text/plain as WeChat often does."""
    q = request.query
    answer = request.app[FAKE].exchange(
        q.get("appid", ""), q.get("secret", ""), q.get("code", ""), q.get("grant_type", "")
    )
    return web.Response(body=orjson.dumps(answer), content_type="text/plain")


async def userinfo(request: web.Request) -> web.Response:
    """The userinfo endpoint (snsapi_userinfo): JSON over GET, as WeChat answers it."""
    q = request.query
    answer = request.app[FAKE].userinfo(q.get("access_token", ""), q.get("openid", ""))
    return web.Response(body=orjson.dumps(answer), content_type="text/plain")


def create_fake_app(fake: FakeWeChat) -> web.Application:
    """The fake WeChat as an aiohttp application."""
    app = web.Application()
    app[FAKE] = fake
    app.router.add_get("/connect/oauth2/authorize", authorize)
    app.router.add_get("/connect/oauth2/fake-decide", decide)
    app.router.add_get("/sns/oauth2/access_token", access_token)
    app.router.add_get("/sns/userinfo", userinfo)
    return app
