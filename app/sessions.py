"""Player sessions in Redis, keyed by an opaque random token.

Lookups from concurrent requests are coalesced into one MGET.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from app.batching import Batcher
from app.scripts import session_key

COOKIE_NAME = "hb_session"
# token_urlsafe(32): 256 random bits in 43 URL-safe characters.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True, slots=True)
class Session:
    """Who a request belongs to."""

    openid: str
    unionid: str | None = None
    # WeChat's snapshot-page user (is_snapshotuser=1): may look, may not grab or draw.
    snapshot: bool = False

    def to_json(self) -> bytes:
        """Serialised form stored in Redis."""
        return orjson.dumps(
            {"openid": self.openid, "unionid": self.unionid, "snapshot": self.snapshot}
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Session:
        """Parse the stored form."""
        data: dict[str, Any] = orjson.loads(raw)
        return cls(
            openid=str(data["openid"]),
            unionid=data.get("unionid"),
            snapshot=bool(data.get("snapshot", False)),
        )


def new_token() -> str:
    """A fresh session token (256 bits)."""
    return secrets.token_urlsafe(32)


def well_formed(token: str) -> bool:
    """Whether ``token`` could have been issued by us (checked before any Redis call)."""
    return bool(_TOKEN_RE.match(token))


class SessionStore:
    """Create, look up and delete sessions."""

    def __init__(self, redis: Redis, ttl_s: int, batch_max: int = 256) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._lookups: Batcher[str, bytes | None] = Batcher(self._mget, max_size=batch_max)

    async def _mget(self, tokens: list[str]) -> list[bytes | None]:
        values = await self._redis.mget([session_key(t) for t in tokens])
        return cast(list[bytes | None], values)

    async def create(self, session: Session) -> str:
        """Store ``session`` under a new token and return the token."""
        token = new_token()
        await self._redis.set(session_key(token), session.to_json(), ex=self._ttl_s)
        return token

    async def get(self, token: str) -> Session | None:
        """The session of ``token``, or None if unknown, expired or malformed."""
        if not well_formed(token):
            return None
        raw = await self._lookups.submit(token)
        return None if raw is None else Session.from_json(raw)

    async def delete(self, token: str) -> None:
        """End the session of ``token``."""
        if well_formed(token):
            await self._redis.delete(session_key(token))

    async def mint(self, openids: list[str], chunk: int = 10_000) -> list[str]:
        """Create sessions for many players at once (load tests); tokens in order."""
        tokens: list[str] = []
        for start in range(0, len(openids), chunk):
            async with self._redis.pipeline(transaction=False) as pipe:
                for openid in openids[start : start + chunk]:
                    token = new_token()
                    tokens.append(token)
                    pipe.set(session_key(token), Session(openid).to_json(), ex=self._ttl_s)
                await pipe.execute()
        return tokens

    async def drain(self) -> None:
        """Finish lookups in flight."""
        await self._lookups.drain()
