"""What the JSON routes answer, as msgspec structs.

The handlers render plain dicts (the hot paths stay as they are); these structs state
the shape of those bodies once, for the OpenAPI document (app.web.openapi), and the
tests check every real answer against the schema made from them. Answers may gain
fields (clients ignore those they do not know); requests may not (see app.validation).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

Count = Annotated[int, msgspec.Meta(ge=0)]
Fen = Annotated[int, msgspec.Meta(ge=0, description="integer fen (1 元 = 100 fen)")]
Tier = Annotated[int, msgspec.Meta(ge=0, description="the tier's index in the definition")]
State = Literal["scheduled", "open", "paused", "sold_out", "ended"]
LotteryState = Literal["scheduled", "open", "paused", "ended"]
Split = Literal["random", "fixed"]
Time = Annotated[datetime | None, msgspec.Meta(description="RFC 3339 in UTC; null: none")]


class Error(msgspec.Struct, kw_only=True):
    """Every error, from the workers and from HAProxy: a stable code and a message."""

    error: str
    message: str
    field: Annotated[str, msgspec.Meta(description="422: the field, in full")] | UnsetType = UNSET
    scope: Literal["total", "daily"] | UnsetType = UNSET
    reason: str | UnsetType = UNSET
    queue_position: Count | UnsetType | None = UNSET


PayoutState = Literal["to_claim", "in_transit", "paid", "failed"]


class Bill(msgspec.Struct, kw_only=True):
    """One WeChat Pay transfer bill of the player's winnings."""

    out_bill_no: str
    amount_fen: Fen
    state: PayoutState
    label: str
    wechat_state: str | None
    claimable: bool
    reason: str | None


class Payout(msgspec.Struct, kw_only=True):
    """How the player's winnings are being paid out (where payouts are configured)."""

    state: PayoutState
    label: str
    amount_fen: Fen
    paid_fen: Fen
    queue_position: Count | None
    bills: list[Bill]


# GET /me carries ``payout`` where payouts are configured: null until a bill exists.
PayoutField = Payout | UnsetType | None


class RedPacketView(msgspec.Struct, kw_only=True):
    """A red packet as players see it."""

    id: str
    kind: Literal["red_packet"]
    name: str
    state: State
    starts_at: Time
    ends_at: Time
    remaining_count: Count
    split: Split


class Prize(msgspec.Struct, kw_only=True):
    """A prize tier as players see it (never its stock or odds)."""

    tier: Tier
    name: str
    value_fen: Annotated[int, msgspec.Meta(ge=1)] | None


class LotteryView(msgspec.Struct, kw_only=True):
    """A lottery as players see it."""

    id: str
    kind: Literal["lottery"]
    name: str
    state: LotteryState
    starts_at: Time
    ends_at: Time
    prizes: list[Prize]
    fallback: str
    quota_total: Count | None
    quota_daily: Count | None


class Grabbed(msgspec.Struct, kw_only=True):
    """This grab won an envelope, or the player had won one already."""

    result: Literal["won", "already_won"]
    amount_fen: Fen


class SoldOut(msgspec.Struct, kw_only=True):
    """No envelope is left."""

    result: Literal["sold_out"]


class EnvelopeWon(msgspec.Struct, kw_only=True):
    """The player's envelope in a red packet."""

    result: Literal["won"]
    amount_fen: Fen
    payout: PayoutField = UNSET


class NothingWon(msgspec.Struct, kw_only=True):
    """The player has no envelope in this red packet."""

    result: Literal["none"]
    payout: PayoutField = UNSET


class PrizeWon(msgspec.Struct, kw_only=True):
    """A prize the player won, and in which of their draws."""

    draw_no: Annotated[int, msgspec.Meta(ge=1)]
    tier: Tier
    name: str
    value_fen: Annotated[int, msgspec.Meta(ge=1)] | None


class LotteryMine(msgspec.Struct, kw_only=True):
    """The player's draws in a lottery (today: the day in Asia/Shanghai) and prizes."""

    result: Literal["prizes", "none"]
    draws: Count
    draws_today: Count
    quota_total: Count | None
    quota_daily: Count | None
    prizes: list[PrizeWon]
    payout: PayoutField = UNSET


class PrizeDrawn(msgspec.Struct, kw_only=True):
    """This draw won a prize."""

    result: Literal["prize"]
    prize: Prize
    draw_no: Annotated[int, msgspec.Meta(ge=1)]


class NoPrize(msgspec.Struct, kw_only=True):
    """This draw won nothing; ``name`` is the lottery's fallback (谢谢参与)."""

    result: Literal["no_prize"]
    name: str
    draw_no: Annotated[int, msgspec.Meta(ge=1)]


class PayoutClaim(msgspec.Struct, kw_only=True):
    """What the page needs to open WeChat Pay's confirmation of the player's next bill."""

    result: Literal["confirm"]
    out_bill_no: str
    amount_fen: Fen
    mch_id: str
    appid: str
    package_info: str
    confirm_url: str | None


class NothingToClaim(msgspec.Struct, kw_only=True):
    """No bill waits for the player's confirmation; ``payout`` says where each one is."""

    result: Literal["nothing_to_confirm"]
    payout: Payout | None


class Tally(msgspec.Struct, kw_only=True):
    """A count of bills and their sum."""

    count: Count
    fen: Fen


# Admin statistics carry ``payouts`` (per WeChat state, and "total") where configured.
PayoutTotals = dict[str, Tally] | UnsetType


class ShardStats(msgspec.Struct, kw_only=True):
    """One sub-pool of a red packet: what it has left, what was won of it and what its
    close-out refunded (a red packet of "shards": 1 has one, the whole campaign)."""

    shard: Annotated[int, msgspec.Meta(ge=0)]
    remaining_count: Count
    remaining_fen: Fen
    won_count: Count
    won_fen: Fen
    refunded_count: Count
    refunded_fen: Fen


class RedPacketStats(msgspec.Struct, kw_only=True):
    """A red packet's definition and live counters (``ledger_lag``: entries not yet in
    PostgreSQL; ``refunded_*``: what its close-out returned to the budget, 0 before);
    ``shards`` sub-pools, ``per_shard`` in shard order, the totals their sums."""

    id: str
    kind: Literal["red_packet"]
    name: str
    state: State
    starts_at: Time
    ends_at: Time
    total_fen: Fen
    count: Count
    min_fen: Fen
    max_fen: Fen | None
    split: Split
    shards: Annotated[int, msgspec.Meta(ge=1, le=256)]
    remaining_count: Count
    remaining_fen: Fen
    won_count: Count
    won_fen: Fen
    refunded_count: Count
    refunded_fen: Fen
    ledger_lag: Count
    per_shard: list[ShardStats]
    payouts: PayoutTotals = UNSET


class TierStats(msgspec.Struct, kw_only=True):
    """A tier's definition and counters: ``released`` by now, ``left`` = released - won."""

    tier: Tier
    name: str
    value_fen: Annotated[int, msgspec.Meta(ge=1)] | None
    weight: Count
    stock: Count
    released: Count
    won: Count
    left: int


class TierLeftover(msgspec.Struct, kw_only=True):
    """What a tier did not give out, at the lottery's close-out: stock never released
    (its slots were at or after the end), and released but not won."""

    tier: Tier
    unreleased: Count
    unwon: Count


class LotteryStats(msgspec.Struct, kw_only=True):
    """A lottery's definition and live counters; days are YYYYMMDD in Asia/Shanghai;
    ``closeout`` once it ended and was closed out."""

    id: str
    kind: Literal["lottery"]
    name: str
    state: LotteryState
    starts_at: Time
    ends_at: Time
    tiers: list[TierStats]
    fallback: str
    no_prize_weight: Count
    quota_total: Count | None
    quota_daily: Count | None
    when_out: Literal["renormalise", "fallback"]
    draws: Count
    prizes_won: Count
    draws_per_day: dict[str, Count]
    prizes_per_day: dict[str, Count]
    ledger_lag: Count
    closeout: list[TierLeftover] | UnsetType = UNSET
    payouts: PayoutTotals = UNSET


class Luck(msgspec.Struct, kw_only=True):
    """One envelope as everyone sees it; ``name`` is the winner's WeChat nickname
    (snsapi_userinfo logins) or openid masked (first 2 + *** + last 2)."""

    name: str
    amount_fen: Fen
    granted_at: datetime


class RedPacketResults(msgspec.Struct, kw_only=True):
    """A red packet's results once it sold out or ended and PostgreSQL holds every grant:
    ``best`` (手气最佳) is the largest envelope, ties to the earliest (null without
    winners, and for a fixed split); ``winners`` the latest 20, latest first."""

    kind: Literal["red_packet"]
    state: Literal["sold_out", "ended"]
    split: Split
    count: Count
    total_fen: Fen
    best: Luck | None
    winners: list[Luck]
    won_count: Count
    won_fen: Fen


class PrizeStock(msgspec.Struct, kw_only=True):
    """A prize tier in the results: its stock and how many were won (per PostgreSQL)."""

    tier: Tier
    name: str
    value_fen: Annotated[int, msgspec.Meta(ge=1)] | None
    stock: Count
    won: Count


class PrizeWinner(msgspec.Struct, kw_only=True):
    """One prize won, as everyone sees it (``name`` as in Luck)."""

    name: str
    tier: Tier
    prize: str
    value_fen: Annotated[int, msgspec.Meta(ge=1)] | None
    drawn_at: datetime


class LotteryResults(msgspec.Struct, kw_only=True):
    """A lottery's prize list and the latest 20 prize winners, latest first."""

    kind: Literal["lottery"]
    state: Literal["scheduled", "open", "paused", "ended"]
    prizes: list[PrizeStock]
    winners: list[PrizeWinner]
    won_count: Count


class RedPacketSummary(msgspec.Struct, kw_only=True, tag_field="kind", tag="red_packet"):
    """A red packet in the operators' list: its live state and counters."""

    id: str
    name: str
    state: State
    starts_at: Time
    ends_at: Time
    created_at: datetime
    total_fen: Fen
    count: Count
    won_count: Count
    won_fen: Fen


class LotterySummary(msgspec.Struct, kw_only=True, tag_field="kind", tag="lottery"):
    """A lottery in the operators' list: its tiers, their total stock, prizes won."""

    id: str
    name: str
    state: LotteryState
    starts_at: Time
    ends_at: Time
    created_at: datetime
    tiers: Count
    stock: Count
    prizes_won: Count


Next = Annotated[
    str | None, msgspec.Meta(description="the cursor of the next page; null: nothing more")
]


class CampaignPage(msgspec.Struct, kw_only=True):
    """Campaigns newest first; a page filtered by state may hold fewer than ``limit``."""

    campaigns: list[RedPacketSummary | LotterySummary]
    next: Next


class AuditEntry(msgspec.Struct, kw_only=True):
    """One state-changing operator call: who, what, the status answered, from where."""

    at: datetime
    operator: str
    role: Literal["admin", "viewer"]
    method: str
    path: str
    campaign_id: str | None
    status: Annotated[int, msgspec.Meta(ge=100, le=599)]
    remote: Annotated[str | None, msgspec.Meta(description="the client, as HAProxy saw it")]
    request_id: str | None


class AuditPage(msgspec.Struct, kw_only=True):
    """Audit entries, newest first."""

    entries: list[AuditEntry]
    next: Next


class WeChatPayFail(msgspec.Struct, kw_only=True):
    """A notification refused, in the form WeChat Pay expects (it retries later)."""

    code: Literal["FAIL"]
    message: str


class LoggedIn(msgspec.Struct, kw_only=True):
    """A session for ``openid``; its token is in the ``hb_session`` cookie."""

    openid: str


class LoggedOut(msgspec.Struct, kw_only=True):
    """The session is deleted and its cookie cleared."""

    result: Literal["logged_out"]


class Health(msgspec.Struct, kw_only=True):
    """The process is alive."""

    status: Literal["ok"]


class Readiness(msgspec.Struct, kw_only=True):
    """Whether this worker can serve grabs; ``message`` names what failed."""

    status: Literal["ready", "draining", "unavailable"]
    message: str | UnsetType = UNSET


class LedgerHealth(msgspec.Struct, kw_only=True):
    """Whether PostgreSQL (the ledger) answers; when down, also an error code and message."""

    ledger: Literal["up", "down"]
    error: Literal["ledger_down"] | UnsetType = UNSET
    message: str | UnsetType = UNSET
