"""PostgreSQL: named operators (tables ``operators``) and the audit log (``audit_log``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

INSERT_OPERATOR = """
INSERT INTO operators (name, role, token_sha256) VALUES ($1, $2, $3)
ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING
RETURNING created_at
"""
SELECT_OPERATORS = """
SELECT name, role, created_at, revoked_at FROM operators ORDER BY name, created_at
"""
REVOKE_OPERATOR = """
UPDATE operators SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL
RETURNING revoked_at
"""
SELECT_BY_TOKEN = """
SELECT name, role FROM operators WHERE token_sha256 = $1 AND revoked_at IS NULL
"""

INSERT_AUDIT = """
INSERT INTO audit_log (operator, role, method, path, campaign_id, status, remote, request_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""
# Newest first; ``$1`` is the id of the last entry of the previous page (NULL: first page).
SELECT_AUDIT = """
SELECT id, at, operator, role, method, path, campaign_id, status, remote, request_id
FROM audit_log WHERE $1::bigint IS NULL OR id < $1
ORDER BY id DESC LIMIT $2
"""


@dataclass(frozen=True, slots=True)
class OperatorRow:
    """One operator as listed (never its token)."""

    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One state-changing operator call, as recorded."""

    operator: str
    role: str
    method: str
    path: str
    campaign_id: str | None
    status: int
    remote: str | None
    request_id: str | None


async def add_operator(pool: asyncpg.Pool, name: str, role: str, token_sha256: bytes) -> bool:
    """Record a live operator; False when a live one already holds ``name``."""
    return await pool.fetchval(INSERT_OPERATOR, name, role, token_sha256) is not None


async def list_operators(pool: asyncpg.Pool) -> list[OperatorRow]:
    """Every operator, live and revoked, by name."""
    return [
        OperatorRow(r["name"], r["role"], r["created_at"], r["revoked_at"])
        for r in await pool.fetch(SELECT_OPERATORS)
    ]


async def revoke_operator(pool: asyncpg.Pool, name: str) -> bool:
    """Revoke the live operator ``name``; False when there is none."""
    return await pool.fetchval(REVOKE_OPERATOR, name) is not None


async def find_operator(pool: asyncpg.Pool, token_sha256: bytes) -> tuple[str, str] | None:
    """(name, role) of the live operator whose token hashes to ``token_sha256``."""
    row = await pool.fetchrow(SELECT_BY_TOKEN, token_sha256)
    return None if row is None else (row["name"], row["role"])


async def insert_audit(pool: asyncpg.Pool, entry: AuditEntry) -> None:
    """Append one entry to the audit log."""
    await pool.execute(
        INSERT_AUDIT,
        entry.operator,
        entry.role,
        entry.method,
        entry.path,
        entry.campaign_id,
        entry.status,
        entry.remote,
        entry.request_id,
    )


async def audit_page(
    pool: asyncpg.Pool, before_id: int | None, limit: int
) -> Sequence[asyncpg.Record]:
    """Up to ``limit`` audit entries older than ``before_id`` (None: the newest), newest
    first."""
    return await pool.fetch(SELECT_AUDIT, before_id, limit)
