"""A red packet's definition: its budget, how it is validated, stored and read back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
import orjson

from app.errors import Invalid
from app.model import Campaign, Kind, optional_ms
from app.records import MalformedRecord, Meta, decode_meta_common, encode_meta, meta_int
from app.redpacket.split import MAX_COUNT, MAX_TOTAL_FEN, Split, envelopes
from app.store.scripts import spread_pools
from app.validation import VISIBLE_TEXT, Timestamp, convert, optional_time_ms

MAX_NAME_LEN = 100
# 5,000 万元 in one envelope is beyond any real campaign.
MAX_ENVELOPE_FEN = 5_000_000_000
# Sub-pools of one red packet: 256 spreads it over a cluster of 256 masters.
MAX_SHARDS = 256

CampaignName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LEN, pattern=VISIBLE_TEXT)
]
EnvelopeFen = Annotated[int, msgspec.Meta(ge=1, le=MAX_ENVELOPE_FEN)]


class RedPacketDefinition(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="red_packet"
):
    """A red packet: ``count`` envelopes summing to ``total_fen``, of random amounts
    (``split`` random, 拼手气红包, the default) or all equal (``fixed``, 普通红包: then
    ``total_fen`` is a multiple of ``count``); ``total_fen`` lies within
    ``[count * min_fen, count * max_fen]``."""

    name: CampaignName
    total_fen: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOTAL_FEN)]
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
    min_fen: EnvelopeFen | None = 1
    max_fen: EnvelopeFen | None = None
    starts_at: Timestamp | None = None
    ends_at: Annotated[Timestamp | None, msgspec.Meta(description="after starts_at")] = None
    split: Annotated[
        Literal["random", "fixed"],
        msgspec.Meta(description="random (double mean) or fixed (total_fen / count each)"),
    ] = "random"
    shards: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=MAX_SHARDS,
            description="sub-pools the envelopes are dealt into, each in its own Redis "
            "Cluster slot (at most count)",
        ),
    ] = 1


@dataclass(frozen=True, slots=True)
class RedPacketSpec:
    """The budget of a red packet: ``count`` envelopes summing to ``total_fen``."""

    total_fen: int
    count: int
    min_fen: int
    max_fen: int | None
    split: Split = Split.RANDOM
    # A sharded red packet's sub-pools' ids (app.store.scripts.spread_pools); envelope
    # seq is dealt to pools[seq % shards]. Empty: one pool, under the campaign's own id.
    pools: tuple[str, ...] = ()

    @property
    def shards(self) -> int:
        """How many sub-pools the envelopes are dealt into."""
        return max(1, len(self.pools))

    def envelopes(self) -> list[int]:
        """The amounts of a new pool, split as ``split`` says."""
        return envelopes(self.split, self.total_fen, self.count, self.min_fen, self.max_fen)

    def config(self) -> dict[str, str]:
        """What the campaigns row keeps beside the budget columns (its ``config``)."""
        config: dict[str, Any] = {"split": str(self.split)}
        if self.shards > 1:
            config["pools"] = list(self.pools)
        return config

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
        return {**self.columns(), "split": str(self.split), "shards": self.shards}


RedPacket = Campaign[RedPacketSpec]


def pools_of(campaign: RedPacket) -> tuple[str, ...]:
    """The ids whose keys hold the campaign's envelopes (CampaignKeys.of each): its
    sub-pools, or the campaign's own id."""
    return campaign.spec.pools or (campaign.id,)


def parse(data: Mapping[str, Any], campaign_id: str) -> RedPacket:
    """Validate a red-packet definition; 422 naming the first bad field."""
    definition = convert(data, RedPacketDefinition)
    total, count = definition.total_fen, definition.count
    min_fen, max_fen = definition.min_fen or 1, definition.max_fen
    if total < count * min_fen:
        raise Invalid("total_fen", "total_fen must be at least count * min_fen")
    if max_fen is not None:
        if max_fen < min_fen:
            raise Invalid("max_fen", "max_fen must be at least min_fen")
        if total > count * max_fen:
            raise Invalid("total_fen", "total_fen must be at most count * max_fen")
    split = Split(definition.split)
    if split is Split.FIXED and total % count:
        raise Invalid("split", "a fixed split needs total_fen to be a multiple of count")
    starts = optional_time_ms(definition.starts_at, "starts_at")
    ends = optional_time_ms(definition.ends_at, "ends_at")
    if starts is not None and ends is not None and ends <= starts:
        raise Invalid("ends_at", "ends_at must be after starts_at")
    if definition.shards > count:
        raise Invalid("shards", "shards must be at most count (a sub-pool holds an envelope)")
    pools = spread_pools(campaign_id, definition.shards) if definition.shards > 1 else ()
    spec = RedPacketSpec(total, count, min_fen, max_fen, split, pools)
    name = definition.name.strip()
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
            "split": str(spec.split),
            # Sharded: the sub-pools' ids; the scripts then leave this meta's stream alone.
            **({"pools": ",".join(spec.pools)} if spec.shards > 1 else {}),
            "won_count": won_count,
            "won_fen": won_fen,
        },
    )


def to_pool_meta(
    campaign: RedPacket, shard: int, budget: tuple[int, int], won: tuple[int, int] = (0, 0)
) -> Meta:
    """The meta hash of a sharded red packet's sub-pool ``shard``: the window the scripts
    check, and the ``budget`` (count, fen) of the envelopes dealt to it with its ``won``
    counters, which close_campaign.lua refunds from. Kind "shard": never read as a
    campaign of its own."""
    return {
        "kind": "shard",
        "campaign": campaign.id,
        "shard": shard,
        "starts_at_ms": campaign.opens_ms,
        "ends_at_ms": campaign.closes_ms,
        "count": budget[0],
        "total_fen": budget[1],
        "won_count": won[0],
        "won_fen": won[1],
    }


def from_meta(campaign_id: str, meta: Mapping[bytes, bytes]) -> RedPacket:
    """Inverse of ``to_meta`` (the definition; counters are read live)."""
    common = decode_meta_common(meta)
    spec = RedPacketSpec(
        total_fen=meta_int(meta, b"total_fen") or 0,
        count=meta_int(meta, b"count") or 0,
        min_fen=meta_int(meta, b"min_fen") or 1,
        max_fen=meta_int(meta, b"max_fen"),
        split=_split(meta.get(b"split", b"random").decode(), campaign_id),
        pools=tuple(meta[b"pools"].decode().split(",")) if b"pools" in meta else (),
    )
    return Campaign(
        campaign_id, Kind.RED_PACKET, common.name, common.starts_at_ms, common.ends_at_ms, spec
    )


def _split(raw: str, campaign_id: str) -> Split:
    """A stored split (campaigns made before split kinds have none: random)."""
    try:
        return Split(raw)
    except ValueError:
        raise MalformedRecord(f"red packet {campaign_id}: unknown split {raw!r}") from None


def from_row(row: asyncpg.Record) -> RedPacket:
    """The definition as PostgreSQL's campaigns row records it (split in ``config``)."""
    config = orjson.loads(row["config"]) if row["config"] else {}
    spec = RedPacketSpec(
        row["total_fen"],
        row["count"],
        row["min_fen"],
        row["max_fen"],
        _split(config.get("split", "random"), row["id"]),
        tuple(config.get("pools", ())),
    )
    return Campaign(
        row["id"],
        Kind.RED_PACKET,
        row["name"],
        optional_ms(row["starts_at"]),
        optional_ms(row["ends_at"]),
        spec,
    )
