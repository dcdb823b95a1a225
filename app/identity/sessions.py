"""Player sessions: stored in Redis, carried in a signed token.

A session is created in Redis (``hb:sess:<sid>``, with the TTL of the session) and the
player gets a token that names it and signs what the hot path needs::

    <sid>.<expires, unix s>.<snapshot 0|1>.<openid, base64url>.<key id>.<MAC, 128 bits>

The MAC is keyed BLAKE2b (a MAC by design, and a few times cheaper per token than
HMAC-SHA256). The keys come from a secret (SESSION_KEYS: ``kid:base64key,...``; the
first signs, every one listed verifies, so a rotation lists the new key first and the
old one second until the old tokens have expired). Only without SESSION_KEYS (a local
run) is the key shared through Redis (``hb:session-key``, key id ``r``, made by the
first worker that needs it), with the trust boundary of Redis itself.

A token is good when its key id is known, its MAC holds, it has not expired and its
expiry is no later than a fresh token's (issue + TTL: a token minted with a longer life
is forged), and its session exists in Redis: each worker asks that once per session
(coalesced into one MGET) and remembers the token with its claims, so a player's next
request skips the MAC too (a dict lookup, then the revocation and expiry checks). The
question is asked only by a request that needs it (``signed``, then ``confirm``): a grab
of a red packet this worker knows is sold out, by a player who won nothing there,
settles and reveals nothing, and is answered on the signature and the revocations the
worker knows of.
Logout deletes the session, records the sid in ``hb:revoked`` until the token would
have expired, and publishes the revocation (app.background.events); a worker trusts
its own memory of revocations and verified tokens only while its event listener is
live, and otherwise asks Redis whether the session still exists on every request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from app.background.events import Events, publish
from app.store.batching import Batcher
from app.store.client import cluster_of
from app.store.scriptline import ScriptLine
from app.store.scripts import REVOKED_SET, SESSION_SIGNING_KEY, session_key

COOKIE_NAME = "hb_session"
# A token is about 100 characters; anything much longer is not ours.
MAX_TOKEN_LEN = 256
# After a signature by the Redis-shared key fails, that key is re-read from Redis at
# most this often (it changes only if Redis lost it).
KEY_RELOAD_S = 1.0
# Key id of the Redis-shared key (zero-config local runs only).
SHARED_KID = "r"
# Workers' clocks may differ this much: a token from a worker whose clock runs ahead
# still has an expiry within issue + TTL for the others.
CLOCK_SLACK_S = 60
# Tokens a worker has verified and seen the session of in Redis, remembered with their
# claims up to this many (about 450 bytes each; then the oldest half is forgotten and
# verified and asked about again).
KNOWN_MAX = 100_000
# The revocations a worker remembers are pruned of expired tokens when they reach twice
# the count left by the last pruning (and at least this many).
PRUNE_MIN = 1024


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, body: str) -> str:
    return _b64(hashlib.blake2b(body.encode(), key=key, digest_size=16).digest())


class Session(NamedTuple):
    """Who a request belongs to."""

    openid: str
    # Stored in Redis, not carried in the token: nothing on the hot path reads it.
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


class Claims(NamedTuple):
    """What a token with a good signature says (and the token itself)."""

    sid: str
    expires_s: int
    session: Session
    token: str


def issue(key: bytes, session: Session, expires_s: int, kid: str = SHARED_KID) -> tuple[str, str]:
    """A new ``(sid, token)`` for ``session``, signed by ``key`` (id ``kid``), valid
    until ``expires_s``."""
    sid = secrets.token_urlsafe(16)
    snapshot = "1" if session.snapshot else "0"
    body = f"{sid}.{expires_s}.{snapshot}.{_b64(session.openid.encode())}.{kid}"
    return sid, f"{body}.{_mac(key, body)}"


def kid_of(token: str) -> str:
    """The key id a token names (its signature unchecked)."""
    parts = token.split(".")
    return parts[4] if len(parts) == 6 else ""


def read(keys: Mapping[str, bytes], token: str) -> Claims | None:
    """The claims of ``token`` if the key it names in ``keys`` signed it, else None
    (expiry not checked)."""
    if len(token) > MAX_TOKEN_LEN or not token.isascii():
        return None
    body, _, mac = token.rpartition(".")
    parts = body.split(".")
    if len(parts) != 5 or parts[4] not in keys:
        return None
    if not hmac.compare_digest(mac.encode(), _mac(keys[parts[4]], body).encode()):
        return None
    sid, expires, snapshot, openid, _ = parts
    try:
        session = Session(_unb64(openid).decode(), None, snapshot == "1")
        return Claims(sid, int(expires), session, token)
    except (ValueError, binascii.Error):
        return None


def sid_of(token: str) -> str:
    """The session id a token names (its signature unchecked)."""
    return token.partition(".")[0]


class SessionStore:
    """Create, verify and end sessions."""

    def __init__(
        self,
        redis: Redis,
        ttl_s: int,
        *,
        keys: Sequence[tuple[str, bytes]] = (),
        events: Events | None = None,
        batch_max: int = 256,
        line: ScriptLine | None = None,
    ) -> None:
        self._redis = redis
        self._line = line
        self._ttl_s = ttl_s
        self._events = events
        # Configured keys (the first signs); none: the Redis-shared key, read when needed.
        self._shared = not keys
        self._keys: dict[str, bytes] = dict(keys)
        self._signing_kid = keys[0][0] if keys else SHARED_KID
        self._key_read_at = 0.0
        # sid -> expiry (unix s) of every revoked session whose token has not expired.
        self._revoked: dict[str, int] = {}
        # token -> claims of tokens whose session this worker has seen exist in Redis
        # (insertion-ordered: oldest first).
        self._known: dict[str, Claims] = {}
        self._prune_at = PRUNE_MIN
        self._exists: Batcher[str, int] = Batcher(self._count, max_size=batch_max)
        if events is not None:
            events.on("revoke", self._on_revoke)
            events.on_resync(self._resync)

    async def _count(self, sids: list[str]) -> list[int]:
        keys = [session_key(sid) for sid in sids]
        if cluster_of(self._redis) is not None:
            # A cluster refuses MGET across slots: one EXISTS per key, pipelined by node.
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                try:
                    return [int(n) for n in await pipe.execute()]
                except (RuntimeError, AttributeError) as exc:
                    # redis-py's cluster pipeline can write on a connection a failed node
                    # just closed: under uvloop a RuntimeError from the closed transport,
                    # or (seen in CI, 2026-12-01) an AttributeError on the writer the
                    # disconnect set to None. A lost connection, as any other.
                    raise ConnectionError(f"Redis Cluster node lost: {exc!r}") from exc
        if self._line is not None:
            # On the hot path's line, without redis-py's pool, retry, timeout and
            # callbacks per call (measured: docs/benchmarks.md, "Third pass").
            values = cast(list[bytes | None], await self._line.call("MGET", *keys))
        else:
            values = cast(list[bytes | None], await self._redis.mget(keys))
        return [0 if value is None else 1 for value in values]

    async def _load_key(self) -> bytes:
        """The Redis-shared signing key, made here if no worker has made it yet."""
        await self._redis.set(SESSION_SIGNING_KEY, secrets.token_bytes(32), nx=True)
        key = cast(bytes, await self._redis.get(SESSION_SIGNING_KEY))
        self._keys[SHARED_KID], self._key_read_at = key, time.monotonic()
        return key

    async def _signing_key(self) -> bytes:
        key = self._keys.get(self._signing_kid)
        return key if key is not None else await self._load_key()

    async def create(self, session: Session) -> str:
        """Store ``session`` and return its token."""
        expires_s = int(time.time()) + self._ttl_s
        sid, token = issue(await self._signing_key(), session, expires_s, self._signing_kid)
        await self._redis.set(session_key(sid), session.to_json(), ex=self._ttl_s)
        return token

    async def verify(self, token: str) -> Claims | None:
        """The claims of ``token`` if one of our keys signed it, it has not expired and
        it expires no later than a token issued now (no Redis call once keys are known)."""
        if self._shared and SHARED_KID not in self._keys:
            await self._load_key()
        claims = read(self._keys, token)
        if (
            claims is None
            and self._shared
            and kid_of(token) == SHARED_KID
            and time.monotonic() - self._key_read_at >= KEY_RELOAD_S
        ):
            # Redis may have lost the key and another worker made a new one.
            await self._load_key()
            claims = read(self._keys, token)
        now = time.time()
        if claims is None or not now < claims.expires_s <= now + self._ttl_s + CLOCK_SLACK_S:
            return None
        return claims

    async def get(self, token: str) -> Session | None:
        """The session of ``token``, or None if forged, expired or ended."""
        claims = await self.signed(token)
        if claims is None or not await self.confirm(claims):
            return None
        return claims.session

    async def signed(self, token: str) -> Claims | None:
        """The claims of ``token`` if it is one of ours, unexpired and, as far as this
        worker coherently knows, not revoked; None otherwise. No Redis call once the keys
        are known, and none at all for a remembered token: whether its session still
        exists is ``confirm``'s question, asked only by a request that needs it."""
        if self._events is not None and self._events.live:
            # Coherent memory: revocations arrive as events, and a token verified with
            # its session seen in Redis is neither verified nor asked about again.
            claims = self._known.get(token)
            if claims is not None:
                if claims.sid in self._revoked or not time.time() < claims.expires_s:
                    return None
                return claims
        claims = await self.verify(token)
        # A revocation heard is final, listening or not (the wait for a key may have
        # spanned a resubscription).
        if claims is None or claims.sid in self._revoked:
            return None
        return claims

    async def confirm(self, claims: Claims) -> bool:
        """Whether the session of ``claims`` (an answer of ``signed``) exists in Redis:
        asked once per token while the event listener is live (then remembered), on
        every call otherwise; coalesced into one MGET."""
        live = self._events is not None and self._events.live
        if live and self._known.get(claims.token) is claims:
            return True
        if not await self._exists.submit(claims.sid):
            return False
        if live:
            self._remember(claims)
        return True

    def _remember(self, claims: Claims) -> None:
        if len(self._known) >= KNOWN_MAX:
            for old in list(itertools.islice(self._known, KNOWN_MAX // 2)):
                del self._known[old]
        self._known[claims.token] = claims

    async def delete(self, token: str) -> None:
        """End the session of ``token`` everywhere."""
        claims = await self.verify(token)
        if claims is None:
            return
        now = int(time.time())
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(session_key(claims.sid))
            pipe.zadd(REVOKED_SET, {claims.sid: claims.expires_s})
            pipe.zremrangebyscore(REVOKED_SET, "-inf", now)
            await pipe.execute()
        argument = f"{claims.sid} {claims.expires_s}"
        if self._events is not None:
            await self._events.publish("revoke", argument)
        else:
            await publish(self._redis, "revoke", argument)

    def _on_revoke(self, argument: str) -> None:
        sid, _, expires = argument.partition(" ")
        # A remembered token of this session is refused by the check of _revoked.
        self._revoked[sid] = int(expires)
        if len(self._revoked) >= self._prune_at:
            now = int(time.time())
            self._revoked = {s: e for s, e in self._revoked.items() if e > now}
            self._prune_at = 2 * len(self._revoked) + PRUNE_MIN

    async def _resync(self) -> None:
        """Reload the shared key and the revocations (after a (re)subscription)."""
        if self._shared:
            await self._load_key()
        # Sessions ended while not listening: their tokens are verified and asked about again.
        self._known.clear()
        now = int(time.time())
        revoked = cast(
            list[tuple[bytes, float]],
            await self._redis.zrangebyscore(REVOKED_SET, now, "+inf", withscores=True),
        )
        self._revoked = {sid.decode(): int(expires) for sid, expires in revoked}

    async def mint(self, openids: list[str], chunk: int = 10_000) -> list[str]:
        """Create sessions for many players at once (load tests); tokens in order."""
        key = await self._signing_key()
        expires_s = int(time.time()) + self._ttl_s
        tokens: list[str] = []
        for start in range(0, len(openids), chunk):
            async with self._redis.pipeline(transaction=False) as pipe:
                for openid in openids[start : start + chunk]:
                    session = Session(openid)
                    sid, token = issue(key, session, expires_s, self._signing_kid)
                    tokens.append(token)
                    pipe.set(session_key(sid), session.to_json(), ex=self._ttl_s)
                await pipe.execute()
        return tokens

    async def drain(self) -> None:
        """Finish lookups in flight."""
        await self._exists.drain()
