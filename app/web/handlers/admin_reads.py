"""Operator reads: the campaign list, the winners CSV and the audit log (any role)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from app.campaigns.listing import Position
from app.campaigns.winners import Row
from app.errors import Invalid, json_response
from app.model import Kind, rfc3339
from app.validation import read_query
from app.web.handlers.deps import require_admin
from app.web.keys import CAMPAIGNS, OPERATORS

CSV = "text/csv"
Limit = Annotated[int, msgspec.Meta(ge=1, le=200, description="1-200 (default 50)")]
Cursor = Annotated[
    str, msgspec.Meta(max_length=200, description="the previous answer's next, as given")
]
# A cell a spreadsheet would run as a formula starts with one of these: such a text
# cell is written with a leading ' (OWASP's advice), so an export never executes.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


# Absent parameters are UNSET, never None: a query string has no null, and "null" would
# otherwise decode as one.
class CampaignQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """GET /api/admin/campaigns: which campaigns, how many, from where."""

    state: Literal["scheduled", "open", "paused", "sold_out", "ended"] | UnsetType = UNSET
    kind: Literal["red_packet", "lottery"] | UnsetType = UNSET
    limit: Limit = 50
    cursor: Cursor | UnsetType = UNSET


class AuditQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """GET /api/admin/audit: how many entries, from where."""

    limit: Limit = 50
    cursor: Cursor | UnsetType = UNSET


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(cursor: str, prefix: str) -> str:
    """The position a cursor of ours names (after ``prefix``); 422 for any other text."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith(prefix):
        raise Invalid("cursor", "cursor is not one this API gave (use the answer's next)")
    return text.removeprefix(prefix)


def _campaign_cursor(position: Position | None) -> str | None:
    if position is None:
        return None
    return _encode(f"c1:{position.created_us}:{position.campaign_id}")


def _campaign_position(cursor: str) -> Position:
    micros, sep, campaign_id = _decode(cursor, "c1:").partition(":")
    if not (sep and micros.isascii() and micros.isdigit() and campaign_id):
        raise Invalid("cursor", "cursor is not one this API gave (use the answer's next)")
    return Position(int(micros), campaign_id)


def _audit_before(cursor: str) -> int:
    entry_id = _decode(cursor, "a1:")
    if not (entry_id.isascii() and entry_id.isdigit() and len(entry_id) <= 18):
        raise Invalid("cursor", "cursor is not one this API gave (use the answer's next)")
    return int(entry_id)


async def list_campaigns(request: web.Request) -> web.Response:
    """GET /api/admin/campaigns: newest first, with live state; keyset pages."""
    require_admin(request)
    query = read_query(request, CampaignQuery)
    campaigns, position = await request.app[CAMPAIGNS].list_page(
        limit=query.limit,
        state=None if query.state is UNSET else query.state,
        kind=None if query.kind is UNSET else Kind(query.kind),
        after=None if query.cursor is UNSET else _campaign_position(query.cursor),
    )
    return json_response({"campaigns": campaigns, "next": _campaign_cursor(position)})


async def audit_log(request: web.Request) -> web.Response:
    """GET /api/admin/audit: state-changing operator calls, newest first."""
    require_admin(request)
    query = read_query(request, AuditQuery)
    before = None if query.cursor is UNSET else _audit_before(query.cursor)
    rows = await request.app[OPERATORS].audit(before, query.limit + 1)
    entries = [
        {
            "at": rfc3339(r["at"]),
            "operator": r["operator"],
            "role": r["role"],
            "method": r["method"],
            "path": r["path"],
            "campaign_id": r["campaign_id"],
            "status": r["status"],
            "remote": r["remote"],
            "request_id": r["request_id"],
        }
        for r in rows[: query.limit]
    ]
    more = len(rows) > query.limit
    next_cursor = _encode(f"a1:{rows[query.limit - 1]['id']}") if more else None
    return json_response({"entries": entries, "next": next_cursor})


def _cells(rows: Iterable[Row]) -> Iterable[Sequence[str | int]]:
    for row in rows:
        yield [
            "'" + cell if isinstance(cell, str) and cell.startswith(_FORMULA) else cell
            for cell in row
        ]


async def winners_csv(request: web.Request) -> web.StreamResponse:
    """GET /api/admin/campaigns/{id}/winners.csv: streamed from PostgreSQL (UTF-8)."""
    require_admin(request)
    winners = await request.app[CAMPAIGNS].winners(request.match_info["id"])
    async with contextlib.aclosing(winners.batches) as batches:
        # The first batch before the answer starts: PostgreSQL down is still a JSON 503.
        rows: list[Row] | None = await anext(batches, [])
        response = web.StreamResponse(
            headers={
                "Content-Disposition": f'attachment; filename="winners-{winners.campaign_id}.csv"',
                "Cache-Control": "no-store",
            }
        )
        response.content_type = CSV
        response.charset = "utf-8"
        await response.prepare(request)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(winners.header)
        while rows is not None:
            writer.writerows(_cells(rows))
            await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
            rows = await anext(batches, None)
        await response.write_eof()
    return response


def setup(app: web.Application) -> None:
    """Register the operators' read routes."""
    app.router.add_get("/api/admin/campaigns", list_campaigns, name="admin_list")
    app.router.add_get(
        "/api/admin/campaigns/{id}/winners.csv", winners_csv, name="admin_winners_csv"
    )
    app.router.add_get("/api/admin/audit", audit_log, name="admin_audit")
