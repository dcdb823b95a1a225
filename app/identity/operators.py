"""Operators: who may call the admin API, with which role.

The bootstrap operator is ``ADMIN_TOKEN`` itself (name ``admin``, role admin): it is
checked in memory, so it works while PostgreSQL is down. Named operators hold a token of
256 random bits (``hbo_`` + 43 base64url characters), shown once when the operator is
added; PostgreSQL keeps only its SHA-256, so a copy of the database grants nothing.

Each worker remembers a token it has verified for ``TOKEN_CACHE_S``: a revocation
therefore takes effect on every worker within that long, and a named token verified
within that long keeps working while PostgreSQL is down (after that: 503, fail closed).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from app.errors import OperationError
from app.reports import table
from app.store import operators as store
from app.store.operators import AuditEntry, OperatorRow
from app.validation import VISIBLE_TEXT

BOOTSTRAP_NAME = "admin"
TOKEN_PREFIX = "hbo_"
# 32 random bytes in base64url without padding.
_TOKEN = re.compile(rf"^{TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}$")
NAME_MAX = 50
_NAME = re.compile(VISIBLE_TEXT)
# How long a worker trusts a named token it has verified: the bound on a revocation.
TOKEN_CACHE_S = 10.0
# Verified tokens remembered per worker at most (operators are few; this bounds memory).
TOKEN_CACHE_MAX = 1024


class Role(enum.StrEnum):
    """What an operator may do: ``admin`` everything, ``viewer`` only read (GET)."""

    ADMIN = "admin"
    VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Operator:
    """Who is calling the admin API."""

    name: str
    role: Role


def new_token() -> str:
    """A fresh operator token: 256 bits from the OS CSPRNG."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    """What PostgreSQL keeps of a token: its SHA-256."""
    return hashlib.sha256(token.encode()).digest()


def check_name(name: str) -> str:
    """``name`` if it can name an operator (1-50 visible characters, not ``admin``)."""
    if not 1 <= len(name) <= NAME_MAX or not _NAME.match(name):
        raise OperationError(f"an operator name is 1-{NAME_MAX} visible characters")
    if name == BOOTSTRAP_NAME:
        raise OperationError(f"{BOOTSTRAP_NAME!r} is the bootstrap operator (ADMIN_TOKEN)")
    return name


class OperatorDirectory:
    """Verifies bearer tokens (the bootstrap one in memory, named ones in PostgreSQL,
    remembered for TOKEN_CACHE_S) and manages named operators."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        bootstrap_token: str | None = None,
        *,
        cache_s: float = TOKEN_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        # None (the CLI): no bootstrap operator; a worker's ADMIN_TOKEN is never empty.
        self._bootstrap = bootstrap_token.encode() if bootstrap_token else None
        self._cache_s = cache_s
        self._clock = clock
        self._verified: dict[bytes, tuple[Operator, float]] = {}

    async def verify(self, token: bytes) -> Operator | None:
        """The operator holding ``token`` (the bytes sent), or None. Raises asyncpg's or
        the OS's error when a named token cannot be checked (PostgreSQL down)."""
        if self._bootstrap is not None and hmac.compare_digest(token, self._bootstrap):
            return Operator(BOOTSTRAP_NAME, Role.ADMIN)
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not _TOKEN.match(text):
            return None
        digest = token_digest(text)
        now = self._clock()
        cached = self._verified.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        found = await store.find_operator(self._pool, digest)
        if found is None:
            self._verified.pop(digest, None)
            return None
        operator = Operator(found[0], Role(found[1]))
        if len(self._verified) >= TOKEN_CACHE_MAX:
            self._verified = {k: v for k, v in self._verified.items() if v[1] > now}
            if len(self._verified) >= TOKEN_CACHE_MAX:
                self._verified.clear()
        self._verified[digest] = (operator, now + self._cache_s)
        return operator

    async def add(self, name: str, role: Role) -> str:
        """Add a named operator; its token (shown once: only its hash is kept)."""
        token = new_token()
        if not await store.add_operator(self._pool, check_name(name), role, token_digest(token)):
            raise OperationError(f"operator {name!r} exists; revoke it first")
        return token

    async def list(self) -> list[OperatorRow]:
        """Every named operator, live and revoked."""
        return await store.list_operators(self._pool)

    async def revoke(self, name: str) -> None:
        """Revoke ``name``'s token (every worker refuses it within TOKEN_CACHE_S)."""
        if not await store.revoke_operator(self._pool, name):
            raise OperationError(f"no live operator named {name!r}")

    async def record(self, entry: AuditEntry) -> None:
        """Append one state-changing call to the audit log."""
        await store.insert_audit(self._pool, entry)

    async def audit(self, before_id: int | None, limit: int) -> Sequence[asyncpg.Record]:
        """Audit entries older than ``before_id`` (None: the newest), newest first."""
        return await store.audit_page(self._pool, before_id, limit)


def _minute(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def render(rows: Sequence[OperatorRow]) -> str:
    """The operators as a table (``hb operator list``), CJK names aligned."""
    if not rows:
        return "no named operators (ADMIN_TOKEN is the bootstrap admin)"
    return table(
        [(r.name, r.role, _minute(r.created_at), _minute(r.revoked_at)) for r in rows],
        ("name", "role", "created", "revoked"),
    )
