"""Dispatch by kind, once: which kind's code reads a stored definition."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from app.lottery import spec as lottery
from app.model import Campaign, Kind
from app.records import MalformedRecord, decode_meta_common
from app.redpacket import spec as red_packet

_FROM_META: dict[Kind, Callable[[str, Mapping[bytes, bytes]], Campaign[Any]]] = {
    Kind.RED_PACKET: red_packet.from_meta,
    Kind.LOTTERY: lottery.from_meta,
}
_FROM_ROW: dict[Kind, Callable[[asyncpg.Record], Campaign[Any]]] = {
    Kind.RED_PACKET: red_packet.from_row,
    Kind.LOTTERY: lottery.from_row,
}


def from_meta(campaign_id: str, meta: Mapping[bytes, bytes]) -> Campaign[Any]:
    """A definition from its Redis meta hash; raises MalformedRecord."""
    return _FROM_META[decode_meta_common(meta).kind](campaign_id, meta)


def from_row(row: asyncpg.Record) -> Campaign[Any]:
    """A definition from its PostgreSQL campaigns row; raises MalformedRecord."""
    try:
        kind = Kind(row["kind"])
    except ValueError:
        raise MalformedRecord(f"campaign {row['id']}: unknown kind {row['kind']!r}") from None
    return _FROM_ROW[kind](row)
