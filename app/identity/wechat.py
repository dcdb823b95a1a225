"""WeChat web authorization (网页授权): the authorize URL and the code exchange.

The exchange is ``GET {api_base}/sns/oauth2/access_token?appid&secret&code&grant_type``;
WeChat answers JSON (often labelled text/plain): the identity, or ``{errcode, errmsg}``.
The secret travels only in that query string: it is never logged, and no exception
raised here carries the request URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

log = logging.getLogger("hongbao.wechat")

# WeChat's documented error codes for the exchange that players can cause.
INVALID_CODE = 40029
CODE_BEEN_USED = 40163


@dataclass(frozen=True, slots=True)
class Identity:
    """Who WeChat says the player is."""

    openid: str
    unionid: str | None
    scope: str
    # is_snapshotuser=1: a virtual account of the snapshot page, may look but not play.
    snapshot: bool


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
        return _parse(status, body)


def _parse(status: int, body: bytes) -> Identity:
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
    return Identity(
        openid=openid,
        unionid=unionid if isinstance(unionid, str) and unionid else None,
        scope=str(data.get("scope", "")),
        snapshot=data.get("is_snapshotuser") == 1,
    )
