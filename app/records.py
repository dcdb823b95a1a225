"""Every record format the stores hold, encoded and decoded here and nowhere else.

* a red packet's envelope, in the pool list and as a winner's value: ``"seq:amount_fen"``;
* a lottery player's prizes: ``"draw_no:tier,draw_no:tier,"``;
* a campaign's meta hash: the common fields (kind, name, window) that every kind
  shares, the kind's own fields beside them;
* ledger stream entries, as the settlement scripts XADD them: a grab is ``u`` openid,
  ``s`` envelope seq, ``a`` fen, ``t`` unix ms; a draw is ``k=draw``, ``u``, ``n`` draw
  number, ``p`` tier or -1, ``a`` fen, ``t`` unix ms, ``d`` YYYYMMDD; a pause or resume
  is ``k=pause``, ``p`` 1 or 0, ``t``; a red packet's close-out is ``k=refund``, ``c``
  envelopes and ``a`` fen returned, ``e`` when it ended, ``t``; a lottery's is
  ``k=leftover``, ``r`` its leftovers per tier (below), ``e``, ``t``;
* a lottery's leftovers at its close-out, per tier in order: ``"unreleased:unwon,"``.

A value that does not parse raises ``MalformedRecord``, whatever the format.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.typing import EncodableT, FieldT

from app.model import Campaign, Kind, Lifecycle, day_date


class MalformedRecord(ValueError):
    """A stored value or stream entry lacks a field or has one that does not parse."""


def text(value: bytes | str) -> str:
    """A Redis reply (bytes) or a string, as a string."""
    return value.decode() if isinstance(value, bytes) else value


Meta = dict[FieldT, EncodableT]


def encode_meta(campaign: Campaign[Any], kind_fields: Meta) -> Meta:
    """The meta hash of a campaign: common fields, then its kind's."""
    return {
        "kind": str(campaign.kind),
        "name": campaign.name,
        "starts_at": "" if campaign.starts_at_ms is None else campaign.starts_at_ms,
        "ends_at": "" if campaign.ends_at_ms is None else campaign.ends_at_ms,
        # The scripts compare against these two; always numbers.
        "starts_at_ms": campaign.opens_ms,
        "ends_at_ms": campaign.closes_ms,
        **kind_fields,
    }


def meta_int(meta: Mapping[bytes, bytes], name: bytes) -> int | None:
    """An optional integer field of a meta hash ("" or absent: None)."""
    raw = meta.get(name, b"")
    try:
        return int(raw) if raw else None
    except ValueError:
        raise MalformedRecord(f"meta field {name!r}: {raw!r}") from None


@dataclass(frozen=True, slots=True)
class MetaCommon:
    """The common part of a meta hash, decoded."""

    kind: Kind
    name: str
    starts_at_ms: int | None
    ends_at_ms: int | None


def decode_meta_common(meta: Mapping[bytes, bytes]) -> MetaCommon:
    """Kind, name and window of a meta hash."""
    try:
        return MetaCommon(
            Kind(meta[b"kind"].decode()),
            meta[b"name"].decode(),
            meta_int(meta, b"starts_at"),
            meta_int(meta, b"ends_at"),
        )
    except (KeyError, ValueError) as exc:
        raise MalformedRecord(f"campaign meta: {exc!r}") from None


# The meta fields a campaign's lifecycle is read from (set_paused.lua, close_campaign.lua).
LIFECYCLE_FIELDS = ("paused", "ends_at_ms", "closed_ms")


def decode_lifecycle(meta: Mapping[bytes, bytes]) -> Lifecycle:
    """Paused, the effective end and whether closed out, from a meta hash (or the
    LIFECYCLE_FIELDS of one)."""
    return Lifecycle(
        paused=meta.get(b"paused") == b"1",
        ends_at_ms=meta_int(meta, b"ends_at_ms"),
        closed=bool(meta.get(b"closed_ms")),
    )


def encode_lifecycle(
    paused: bool,
    ends_at_ms: int | None = None,
    closed_ms: int | None = None,
    refunded: tuple[int, int] | None = None,
) -> Meta:
    """The lifecycle fields of a red packet's meta hash as set_paused.lua and
    close_campaign.lua write them (a rebuild restores them): ``refunded`` is the
    close-out's (count, fen)."""
    meta: Meta = {"paused": "1" if paused else "0"}
    if ends_at_ms is not None:
        meta["ends_at_ms"] = ends_at_ms
    if closed_ms is not None:
        meta["closed_ms"] = closed_ms
    if refunded is not None:
        meta["refunded_count"], meta["refunded_fen"] = refunded
    return meta


def lifecycle_of(values: list[bytes | None]) -> Lifecycle:
    """``decode_lifecycle`` of an HMGET of LIFECYCLE_FIELDS."""
    return decode_lifecycle(
        {f.encode(): v for f, v in zip(LIFECYCLE_FIELDS, values, strict=True) if v is not None}
    )


@dataclass(frozen=True, slots=True)
class TierLeftover:
    """What a lottery tier did not give out: stock never released, released and unwon."""

    unreleased: int
    unwon: int


def decode_leftovers(raw: bytes | str) -> tuple[TierLeftover, ...]:
    """A lottery's leftovers, ``"unreleased:unwon,"`` per tier in order."""
    out = []
    for part in text(raw).split(","):
        if not part:
            continue
        unreleased, sep, unwon = part.partition(":")
        try:
            if not sep:
                raise ValueError("no ':'")
            out.append(TierLeftover(int(unreleased), int(unwon)))
        except ValueError as exc:
            raise MalformedRecord(f"lottery leftovers {raw!r}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One red-packet envelope: its position in the split and its amount."""

    seq: int
    amount_fen: int

    def encode(self) -> str:
        """The pool and winners value."""
        return f"{self.seq}:{self.amount_fen}"

    @classmethod
    def decode(cls, raw: bytes | str) -> Envelope:
        """Inverse of ``encode``."""
        seq, sep, amount = text(raw).partition(":")
        try:
            if not sep:
                raise ValueError("no ':'")
            return cls(int(seq), int(amount))
        except ValueError as exc:
            raise MalformedRecord(f"envelope {raw!r}: {exc}") from None

    def __str__(self) -> str:
        return f"envelope {self.seq} ({self.amount_fen} fen)"


def decode_wins(raw: bytes | str | None) -> list[tuple[int, int]]:
    """A lottery player's prizes, ``(draw_no, tier)`` in the order won."""
    out = []
    for part in text(raw or b"").split(","):
        if not part:
            continue
        draw_no, sep, tier = part.partition(":")
        try:
            if not sep:
                raise ValueError("no ':'")
            out.append((int(draw_no), int(tier)))
        except ValueError as exc:
            raise MalformedRecord(f"lottery wins {raw!r}: {exc}") from None
    return out


class EntryKind(enum.StrEnum):
    """The ``k`` field of a ledger stream entry (absent: a grab)."""

    GRAB = "grab"
    DRAW = "draw"
    PAUSE = "pause"
    REFUND = "refund"
    LEFTOVER = "leftover"


@dataclass(frozen=True, slots=True)
class GrabRecord:
    """One red-packet grant, as the ledger stream carries it."""

    campaign_id: str
    stream_id: str
    openid: str
    seq: int
    amount_fen: int
    at_ms: int

    @property
    def envelope(self) -> Envelope:
        """The envelope granted."""
        return Envelope(self.seq, self.amount_fen)


@dataclass(frozen=True, slots=True)
class DrawRecord:
    """One lottery draw, as the ledger stream carries it (tier None: no prize)."""

    campaign_id: str
    stream_id: str
    openid: str
    draw_no: int
    tier: int | None
    value_fen: int
    day: int  # YYYYMMDD, Asia/Shanghai
    at_ms: int


@dataclass(frozen=True, slots=True)
class PauseRecord:
    """An operator paused (or resumed) a campaign at ``at_ms``."""

    campaign_id: str
    stream_id: str
    paused: bool
    at_ms: int


@dataclass(frozen=True, slots=True)
class CloseoutRecord:
    """A campaign's close-out: a red packet's envelopes and fen returned to the budget
    (``tiers`` None), or a lottery's leftovers per tier (count and fen 0); a sharded red
    packet has one per sub-pool (``shard``)."""

    campaign_id: str
    stream_id: str
    refunded_count: int
    refunded_fen: int
    tiers: tuple[TierLeftover, ...] | None
    ended_ms: int
    at_ms: int
    shard: int = 0


Record = GrabRecord | DrawRecord | PauseRecord | CloseoutRecord


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One entry of a campaign's ledger stream, as read: fields still undecoded
    (``shard``: the sub-pool whose stream it is, of a sharded red packet)."""

    campaign_id: str
    stream_id: str
    fields: dict[str, str]
    shard: int = 0

    @classmethod
    def of(
        cls,
        campaign_id: str,
        raw_id: bytes | str,
        raw_fields: Mapping[bytes, bytes] | Mapping[str, str],
        shard: int = 0,
    ) -> LedgerEntry:
        """An entry from a Redis reply (bytes or decoded strings)."""
        fields = {text(k): text(v) for k, v in raw_fields.items()}
        return cls(campaign_id, text(raw_id), fields, shard)

    @property
    def kind(self) -> str:
        """Field ``k`` (a grab when absent); may name no EntryKind in a corrupt entry."""
        return self.fields.get("k", EntryKind.GRAB)

    def decode(self) -> Record:
        """The grant, draw, pause or close-out this entry records; raises MalformedRecord."""
        f = self.fields
        where = f"{self.kind} entry {self.stream_id}"
        try:
            if self.kind == EntryKind.GRAB:
                grab = GrabRecord(
                    self.campaign_id, self.stream_id, f["u"], int(f["s"]), int(f["a"]), int(f["t"])
                )
                if not grab.openid or grab.seq < 0 or grab.amount_fen <= 0:
                    raise ValueError("out of range")
                return grab
            if self.kind == EntryKind.DRAW:
                tier = int(f["p"])
                draw = DrawRecord(
                    self.campaign_id,
                    self.stream_id,
                    f["u"],
                    int(f["n"]),
                    None if tier < 0 else tier,
                    int(f["a"]),
                    int(f["d"]),
                    int(f["t"]),
                )
                day_date(draw.day)
                return draw
            if self.kind == EntryKind.PAUSE:
                if f["p"] not in ("0", "1"):
                    raise ValueError(f"p={f['p']!r}")
                return PauseRecord(self.campaign_id, self.stream_id, f["p"] == "1", int(f["t"]))
            if self.kind == EntryKind.REFUND:
                refund = CloseoutRecord(
                    self.campaign_id,
                    self.stream_id,
                    int(f["c"]),
                    int(f["a"]),
                    None,
                    int(f["e"]),
                    int(f["t"]),
                    self.shard,
                )
                if refund.refunded_count < 0 or refund.refunded_fen < 0:
                    raise ValueError("out of range")
                return refund
            if self.kind == EntryKind.LEFTOVER:
                tiers = decode_leftovers(f["r"])
                if any(t.unreleased < 0 or t.unwon < 0 for t in tiers):
                    raise ValueError("out of range")
                return CloseoutRecord(
                    self.campaign_id, self.stream_id, 0, 0, tiers, int(f["e"]), int(f["t"])
                )
        except KeyError as exc:
            raise MalformedRecord(f"{where}: no field {exc}") from None
        except ValueError as exc:
            raise MalformedRecord(f"{where}: {exc}") from None
        raise MalformedRecord(f"{where}: unknown kind {self.kind!r}")
