"""A red packet's definition: its budget, how it is validated, stored and read back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.errors import Invalid
from app.model import Campaign, Kind, optional_ms
from app.records import Meta, decode_meta_common, encode_meta, meta_int
from app.redpacket.split import MAX_COUNT, MAX_TOTAL_FEN
from app.validation import get_int, get_optional_int, get_str, get_time_ms, reject_unknown

MAX_NAME_LEN = 100
# 5,000 万元 in one envelope is beyond any real campaign.
MAX_ENVELOPE_FEN = 5_000_000_000
FIELDS = {"kind", "name", "total_fen", "count", "min_fen", "max_fen", "starts_at", "ends_at"}


@dataclass(frozen=True, slots=True)
class RedPacketSpec:
    """The budget of a red packet: ``count`` envelopes summing to ``total_fen``."""

    total_fen: int
    count: int
    min_fen: int
    max_fen: int | None

    def columns(self) -> dict[str, int | None]:
        """The campaigns row's budget columns."""
        return {
            "total_fen": self.total_fen,
            "count": self.count,
            "min_fen": self.min_fen,
            "max_fen": self.max_fen,
        }

    def view(self) -> dict[str, Any]:
        """The budget as the operator sees it."""
        return self.columns()


RedPacket = Campaign[RedPacketSpec]


def parse(data: Mapping[str, Any], campaign_id: str) -> RedPacket:
    """Validate a red-packet definition; 422 naming the first bad field."""
    reject_unknown(data, FIELDS)
    name = get_str(data, "name", max_len=MAX_NAME_LEN)
    count = get_int(data, "count", minimum=1, maximum=MAX_COUNT)
    total = get_int(data, "total_fen", minimum=1, maximum=MAX_TOTAL_FEN)
    min_fen = get_int(data, "min_fen", minimum=1, maximum=MAX_ENVELOPE_FEN, default=1)
    max_fen = get_optional_int(data, "max_fen", minimum=1, maximum=MAX_ENVELOPE_FEN)
    if total < count * min_fen:
        raise Invalid("total_fen", "total_fen must be at least count * min_fen")
    if max_fen is not None:
        if max_fen < min_fen:
            raise Invalid("max_fen", "max_fen must be at least min_fen")
        if total > count * max_fen:
            raise Invalid("total_fen", "total_fen must be at most count * max_fen")
    starts = get_time_ms(data, "starts_at")
    ends = get_time_ms(data, "ends_at")
    if starts is not None and ends is not None and ends <= starts:
        raise Invalid("ends_at", "ends_at must be after starts_at")
    spec = RedPacketSpec(total, count, min_fen, max_fen)
    return Campaign(campaign_id, Kind.RED_PACKET, name, starts, ends, spec)


def to_meta(campaign: RedPacket, won_count: int = 0, won_fen: int = 0) -> Meta:
    """The meta hash that opens a red packet, with its won counters."""
    spec = campaign.spec
    return encode_meta(
        campaign,
        {
            "total_fen": spec.total_fen,
            "count": spec.count,
            "min_fen": spec.min_fen,
            "max_fen": "" if spec.max_fen is None else spec.max_fen,
            "won_count": won_count,
            "won_fen": won_fen,
        },
    )


def from_meta(campaign_id: str, meta: Mapping[bytes, bytes]) -> RedPacket:
    """Inverse of ``to_meta`` (the definition; counters are read live)."""
    common = decode_meta_common(meta)
    spec = RedPacketSpec(
        total_fen=meta_int(meta, b"total_fen") or 0,
        count=meta_int(meta, b"count") or 0,
        min_fen=meta_int(meta, b"min_fen") or 1,
        max_fen=meta_int(meta, b"max_fen"),
    )
    return Campaign(
        campaign_id, Kind.RED_PACKET, common.name, common.starts_at_ms, common.ends_at_ms, spec
    )


def from_row(row: asyncpg.Record) -> RedPacket:
    """The definition as PostgreSQL's campaigns row records it."""
    spec = RedPacketSpec(row["total_fen"], row["count"], row["min_fen"], row["max_fen"])
    return Campaign(
        row["id"],
        Kind.RED_PACKET,
        row["name"],
        optional_ms(row["starts_at"]),
        optional_ms(row["ends_at"]),
        spec,
    )
