"""WeChat login: a state bound to the browser, the code exchange, the session.

``start`` records a login under a random ``state`` with the hash of a pre-login cookie
and where to go afterwards. ``finish`` (the callback) claims that login for one code
from the same browser, exchanges the code and creates the session; WeChat's habit of
calling the callback twice with one code ends in the same session both times.

Login starts need no session, so what one stores is kept to what the callback needs
(a 128-bit browser digest and the path to return to: about 200 bytes of Redis memory
with the key and its expiry) for ``LOGIN_TTL_S``; HAProxy bounds how many one client
address may start (HB_LOGIN_RATE).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from typing import cast

import asyncpg
from redis.asyncio import Redis

from app.identity.sessions import Session, SessionStore
from app.identity.wechat import (
    CODE_BEEN_USED,
    INVALID_CODE,
    WeChatClient,
    WeChatError,
    WeChatUnavailable,
)
from app.store.results import remember_name
from app.store.scripts import RedeemCode, Scripts, login_key

log = logging.getLogger("hongbao.login")

# From /auth/wechat/login to the callback: WeChat's page, the player reading it (the
# code WeChat hands back lives five minutes too).
LOGIN_TTL_S = 300
# How long a finished login still answers a repeated callback with its session.
DONE_TTL_S = 300
PENDING_WAIT_S = 5.0
PENDING_POLL_S = 0.05
MAX_NEXT_LEN = 512
MAX_CODE_LEN = 256
# WeChat allows a-zA-Z0-9 in state, up to 128 bytes; 128 random bits in hex.
_STATE_RE = re.compile(r"^[0-9a-f]{32}$")
_COOKIE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_CODE_RE = re.compile(r"^[\x21-\x7e]+$")
# Keeping a nickname (snsapi_userinfo) never holds a login up longer than this.
NAME_WRITE_S = 1.0


class LoginFailed(Exception):
    """A login that cannot finish; ``reason`` names why, ``next`` is where it was going."""

    def __init__(self, reason: str, next_path: str = "/", errcode: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.next = next_path
        self.errcode = errcode


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """A finished login: the session token and the same-origin path to go to."""

    token: str
    next: str


def safe_next(raw: str | None) -> str:
    """``raw`` if it is a path on this site, else "/": never an open redirect.

    Only a single leading slash is allowed: ``//host`` and ``/\\host`` are other sites
    to a browser, which also drops tabs and newlines, so control characters, spaces
    and backslashes are refused outright, as is anything not plain ASCII.
    """
    if not raw or len(raw) > MAX_NEXT_LEN or not raw.startswith("/") or raw.startswith("//"):
        return "/"
    if any(not 0x21 <= ord(ch) <= 0x7E or ch == "\\" for ch in raw):
        return "/"
    return raw


def new_browser_cookie() -> str:
    """A fresh pre-login cookie value (256 bits)."""
    return secrets.token_urlsafe(32)


def browser_cookie_ok(value: str | None) -> bool:
    """Whether ``value`` could be a pre-login cookie we issued."""
    return value is not None and bool(_COOKIE_RE.match(value))


def _digest(value: str) -> str:
    """128 bits of SHA-256, base64url: enough to bind a login, small to store."""
    return base64.urlsafe_b64encode(hashlib.sha256(value.encode()).digest()[:16]).decode()[:22]


class LoginService:
    """Starts and finishes WeChat logins; state lives in Redis, shared by all workers."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        sessions: SessionStore,
        wechat: WeChatClient,
        names: asyncpg.Pool | None = None,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._sessions = sessions
        self.wechat = wechat
        # Where nicknames are kept for the public results (PostgreSQL's player_names).
        self._names = names

    async def start(self, next_path: str, browser_cookie: str) -> str:
        """Record a login for this browser; return its ``state``."""
        state = secrets.token_hex(16)
        key = login_key(state)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"b": _digest(browser_cookie), "next": safe_next(next_path)})
            pipe.expire(key, LOGIN_TTL_S)
            await pipe.execute()
        return state

    async def abandon(self, state: str, browser_cookie: str | None) -> str:
        """The player refused: forget the login, return where it was going (or "/")."""
        if not _STATE_RE.match(state) or not browser_cookie_ok(browser_cookie):
            return "/"
        key = login_key(state)
        b, nxt = cast(list[bytes | None], await self._redis.hmget(key, "b", "next"))
        if b is None or nxt is None or b.decode() != _digest(cast(str, browser_cookie)):
            return "/"
        await self._redis.delete(key)
        return safe_next(nxt.decode())

    async def finish(self, state: str, code: str, browser_cookie: str | None) -> LoggedIn:
        """Exchange ``code`` for a session, once per login; raise LoginFailed."""
        if not _STATE_RE.match(state) or not browser_cookie_ok(browser_cookie):
            raise LoginFailed("bad_state")
        if len(code) > MAX_CODE_LEN or not _CODE_RE.match(code):
            raise LoginFailed("invalid_code")
        redeemed = await self._scripts.redeem_login(
            state, _digest(cast(str, browser_cookie)), _digest(code)
        )
        nxt = safe_next(redeemed.next)
        if redeemed.code is RedeemCode.DONE and redeemed.token is not None:
            return LoggedIn(redeemed.token, nxt)
        if redeemed.code is RedeemCode.PENDING:
            return LoggedIn(await self._wait_for_token(state, nxt), nxt)
        if redeemed.code is RedeemCode.OTHER_CODE:
            raise LoginFailed("code_used", nxt)
        if redeemed.code is not RedeemCode.CLAIMED:
            raise LoginFailed("bad_state")
        return LoggedIn(await self._exchange(state, code, nxt), nxt)

    async def _exchange(self, state: str, code: str, nxt: str) -> str:
        key = login_key(state)
        try:
            identity = await self.wechat.exchange_code(code)
        except WeChatUnavailable:
            # Let a reload of the same callback try again.
            await self._redis.hdel(key, "c")
            raise LoginFailed("unavailable", nxt) from None
        except WeChatError as exc:
            await self._redis.delete(key)
            reason = {INVALID_CODE: "invalid_code", CODE_BEEN_USED: "code_used"}.get(
                exc.errcode, "wechat_error"
            )
            raise LoginFailed(reason, nxt, exc.errcode) from None
        token = await self._sessions.create(
            Session(identity.openid, identity.unionid, snapshot=identity.snapshot)
        )
        if identity.nickname is not None:
            await self._remember(identity.openid, identity.nickname)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "t", token)
            pipe.expire(key, DONE_TTL_S)
            await pipe.execute()
        return token

    async def _remember(self, openid: str, nickname: str) -> None:
        """Keep the nickname for the results; a PostgreSQL that is down or slow costs the
        name (shown masked until a later login), never the login."""
        if self._names is None:
            return
        try:
            await asyncio.wait_for(remember_name(self._names, openid, nickname), NAME_WRITE_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("nickname of a login not kept: %s", type(exc).__name__)

    async def _wait_for_token(self, state: str, nxt: str) -> str:
        """Another request is exchanging this very code: wait for its session."""
        key = login_key(state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PENDING_WAIT_S
        while loop.time() < deadline:
            await asyncio.sleep(PENDING_POLL_S)
            token, claimed = cast(list[bytes | None], await self._redis.hmget(key, "t", "c"))
            if token is not None:
                return token.decode()
            if claimed is None:
                # The other request failed and released or dropped the login.
                raise LoginFailed("unavailable", nxt)
        raise LoginFailed("busy", nxt)
