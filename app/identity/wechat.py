"""WeChat web authorization (网页授权): the authorize URL and the code exchange.

The exchange is ``GET {api_base}/sns/oauth2/access_token?appid&secret&code&grant_type``;
WeChat answers JSON (often labelled text/plain): the identity, or ``{errcode, errmsg}``.
With scope ``snsapi_userinfo`` the player's nickname is then asked for with the access
token the exchange returned (``GET {api_base}/sns/userinfo?access_token&openid&lang``); a
login never fails for want of it (the nickname stays unknown).
The secret travels only in that query string: it is never logged, and no exception
raised here carries the request URL.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

log = logging.getLogger("hongbao.wechat")

# WeChat's documented error codes for the exchange that players can cause.
INVALID_CODE = 40029
CODE_BEEN_USED = 40163
USERINFO_SCOPE = "snsapi_userinfo"
# A nickname as shown to other players: no control characters, at most this long.
MAX_NICKNAME_LEN = 32
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who WeChat says the player is."""

    openid: str
    unionid: str | None
    scope: str
    # is_snapshotuser=1: a virtual account of the snapshot page, may look but not play.
    snapshot: bool
    # The WeChat nickname (scope snsapi_userinfo only; None when not asked or not given).
    nickname: str | None = None


class WeChatError(Exception):
    """WeChat refused the exchange with ``errcode``/``errmsg``."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(f"wechat errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg


class WeChatUnavailable(Exception):
    """WeChat did not answer, or answered something that is not its wire format."""


class WeChatClient:
    """Builds authorize URLs and exchanges codes over one shared HTTP session."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        appid: str,
        secret: str,
        authorize_url: str,
        api_base: str,
        scope: str,
    ) -> None:
        self._http = http
        self._appid = appid
        self._secret = secret
        self._authorize_url = authorize_url
        self._token_url = f"{api_base}/sns/oauth2/access_token"
        self._userinfo_url = f"{api_base}/sns/userinfo"
        self.scope = scope

    @property
    def configured(self) -> bool:
        """Whether an appid and secret are set."""
        return bool(self._appid and self._secret)

    def authorize_url(self, redirect_uri: str, state: str) -> str:
        """The URL the browser goes to, parameters in WeChat's documented order."""
        return (
            f"{self._authorize_url}?appid={quote(self._appid, safe='')}"
            f"&redirect_uri={quote(redirect_uri, safe='')}"
            f"&response_type=code&scope={self.scope}&state={state}#wechat_redirect"
        )

    async def exchange_code(self, code: str) -> Identity:
        """Trade a one-time code for the player's identity."""
        params = {
            "appid": self._appid,
            "secret": self._secret,
            "code": code,
            "grant_type": "authorization_code",
        }
        try:
            async with self._http.get(self._token_url, params=params) as resp:
                status = resp.status
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The exception text may hold the URL, and so the secret: log its type only.
            log.warning("wechat token endpoint unreachable: %s", type(exc).__name__)
            raise WeChatUnavailable("wechat did not answer") from None
        identity, access_token = _parse(status, body)
        if access_token and not identity.snapshot and USERINFO_SCOPE in identity.scope:
            nickname = await self._nickname(access_token, identity.openid)
            identity = dataclasses.replace(identity, nickname=nickname)
        return identity

    async def _nickname(self, access_token: str, openid: str) -> str | None:
        """The player's nickname from /sns/userinfo, or None (logged) if WeChat will not say."""
        params = {"access_token": access_token, "openid": openid, "lang": "zh_CN"}
        try:
            async with self._http.get(self._userinfo_url, params=params) as resp:
                status = resp.status
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The URL holds the access token: log the exception's type only.
            log.warning("wechat userinfo unreachable: %s", type(exc).__name__)
            return None
        try:
            data: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if status != 200 or not isinstance(data, dict) or data.get("openid") != openid:
            errcode = data.get("errcode") if isinstance(data, dict) else None
            log.warning("wechat userinfo refused: HTTP %s errcode %s", status, errcode)
            return None
        return clean_nickname(data.get("nickname"))


def clean_nickname(raw: object) -> str | None:
    """A nickname fit to show: control characters dropped, trimmed, at most
    MAX_NICKNAME_LEN characters; None if nothing is left."""
    if not isinstance(raw, str):
        return None
    nickname = _CONTROL.sub("", raw).strip()[:MAX_NICKNAME_LEN]
    return nickname or None


def _parse(status: int, body: bytes) -> tuple[Identity, str | None]:
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if status != 200 or not isinstance(data, dict):
        log.warning("wechat token endpoint answered HTTP %s without JSON", status)
        raise WeChatUnavailable("wechat answered something unexpected")
    errcode = data.get("errcode")
    if isinstance(errcode, int) and errcode != 0:
        errmsg = str(data.get("errmsg", ""))
        log.info("wechat refused the code: errcode %s (%s)", errcode, errmsg)
        raise WeChatError(errcode, errmsg)
    openid = data.get("openid")
    if not isinstance(openid, str) or not openid:
        log.warning("wechat token answer without openid")
        raise WeChatUnavailable("wechat answered without openid")
    unionid = data.get("unionid")
    access_token = data.get("access_token")
    identity = Identity(
        openid=openid,
        unionid=unionid if isinstance(unionid, str) and unionid else None,
        scope=str(data.get("scope", "")),
        snapshot=data.get("is_snapshotuser") == 1,
    )
    return identity, access_token if isinstance(access_token, str) else None
