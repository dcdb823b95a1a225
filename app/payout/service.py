"""Payouts as players and WeChat Pay's notifications see them, and the operators' totals."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from app.errors import ApiError
from app.payout.client import cipher_of, verifier_of
from app.payout.wechatpay import MAX_SKEW_S, SignatureError
from app.settings import PayoutSettings
from app.store import payouts
from app.store.payouts import STATES, Bill
from app.store.scripts import PAYOUT_NONCE_KEY

log = logging.getLogger("hongbao.payout")

# What the player reads for each WeChat state (our NEW: the bill is still in the queue).
_PLAYER_STATE = {
    "NEW": "to_claim",
    "ACCEPTED": "to_claim",
    "PROCESSING": "to_claim",
    "WAIT_USER_CONFIRM": "to_claim",
    "TRANSFERING": "in_transit",
    "SUCCESS": "paid",
    "FAIL": "failed",
    "CANCELING": "failed",
    "CANCELLED": "failed",
}
LABELS = {"to_claim": "待领取", "in_transit": "到账中", "paid": "已到账", "failed": "未到账"}
# Which label a player with several bills sees first: what still needs them.
_ORDER = ("to_claim", "in_transit", "failed", "paid")


class PayoutsOff(ApiError):
    status = 503
    code = "payouts_off"


class NoPayout(ApiError):
    status = 404
    code = "no_payout"


class PayoutNotReady(ApiError):
    """The bill is still queued for creation at WeChat Pay."""

    status = 409
    code = "payout_not_ready"


class NotificationRefused(Exception):
    """A notification we do not accept; WeChat Pay gets ``{"code": "FAIL", ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reason(bill: Bill) -> str | None:
    if bill.state in ("CANCELLED", "CANCELING"):
        return "超时未确认收款，已撤销"
    if bill.state == "FAIL":
        return f"转账失败（{bill.fail_reason or '微信支付未说明原因'}）"
    return None


def bill_view(bill: Bill) -> dict[str, Any]:
    """One bill as the player's page shows it."""
    state = _PLAYER_STATE[bill.state]
    return {
        "out_bill_no": bill.out_bill_no,
        "amount_fen": bill.amount_fen,
        "state": state,
        "label": LABELS[state],
        "wechat_state": None if bill.state == "NEW" else bill.state,
        "claimable": bill.state == "WAIT_USER_CONFIRM" and bool(bill.package_info),
        "reason": _reason(bill),
    }


class PayoutService:
    """Reads and claims of a player's bills, and WeChat Pay's notifications."""

    def __init__(self, pg: asyncpg.Pool, redis: Redis, settings: PayoutSettings) -> None:
        self._pg = pg
        self._redis = redis
        self._settings = settings
        self._verifier = verifier_of(settings) if settings.enabled else None
        self._cipher = cipher_of(settings) if settings.enabled else None

    @property
    def enabled(self) -> bool:
        """Whether a merchant is configured (else views carry no payout fields)."""
        return self._settings.enabled

    async def player_view(self, campaign_id: str, openid: str) -> dict[str, Any] | None:
        """The ``payout`` field of GET /me: overall state, label, and each bill."""
        bills = await payouts.player_bills(self._pg, campaign_id, openid)
        if not bills:
            return None
        views = [bill_view(b) for b in bills]
        state = next(s for s in _ORDER if any(v["state"] == s for v in views))
        queued = next((b for b in bills if b.state == "NEW"), None)
        return {
            "state": state,
            "label": LABELS[state],
            "amount_fen": sum(b.amount_fen for b in bills),
            "paid_fen": sum(b.amount_fen for b in bills if b.state == "SUCCESS"),
            "queue_position": (
                None if queued is None else await payouts.queue_position(self._pg, queued)
            ),
            "bills": views,
        }

    async def claim(self, campaign_id: str, openid: str) -> dict[str, Any]:
        """What the page needs to open the confirmation of the player's next bill."""
        if not self._settings.enabled:
            raise PayoutsOff("payouts to WeChat are not configured here")
        bills = await payouts.player_bills(self._pg, campaign_id, openid)
        if not bills:
            raise NoPayout("nothing to pay out to you in this campaign (yet)")
        for bill in bills:
            if bill.state == "WAIT_USER_CONFIRM" and bill.package_info:
                return {
                    "result": "confirm",
                    "out_bill_no": bill.out_bill_no,
                    "amount_fen": bill.amount_fen,
                    "mch_id": self._settings.mchid,
                    "appid": self._settings.appid,
                    "package_info": bill.package_info,
                    "confirm_url": self._settings.confirm_url or None,
                }
        queued = [b for b in bills if b.state in ("NEW", "ACCEPTED", "PROCESSING")]
        if queued:
            position = await payouts.queue_position(self._pg, queued[0])
            raise PayoutNotReady(
                "your transfer is being prepared; try again in a moment",
                queue_position=position,
            )
        view = await self.player_view(campaign_id, openid)
        return {"result": "nothing_to_confirm", "payout": view}

    async def totals(self, campaign_id: str) -> dict[str, dict[str, int]]:
        """The admin stats' ``payouts``: count and fen per state, and in all."""
        found = await payouts.totals(self._pg, campaign_id)
        out = {s: {"count": c, "fen": f} for s, (c, f) in sorted(found.items())}
        out["total"] = {
            "count": sum(c for c, _ in found.values()),
            "fen": sum(f for _, f in found.values()),
        }
        return out

    async def notify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Verify, decrypt and apply one WeChat Pay notification; idempotent."""
        if self._verifier is None or self._cipher is None:
            raise NotificationRefused(404, "payouts are not configured")
        text = body.decode("utf-8", "replace")
        try:
            nonce = self._verifier.check(headers, text)
        except SignatureError as exc:
            raise NotificationRefused(401, f"signature refused: {exc}") from None
        # A signed message is fresh for MAX_SKEW_S; within that, its nonce is seen once.
        first = await self._redis.set(PAYOUT_NONCE_KEY + nonce, "1", nx=True, ex=2 * MAX_SKEW_S)
        if not first:
            raise NotificationRefused(400, "replayed notification")
        try:
            envelope = orjson.loads(body)
            resource = envelope["resource"]
            if resource.get("algorithm") != "AEAD_AES_256_GCM":
                raise NotificationRefused(400, "unknown resource algorithm")
            plain = self._cipher.decrypt(
                str(resource["ciphertext"]),
                str(resource["nonce"]),
                str(resource.get("associated_data", "")),
            )
            result = orjson.loads(plain)
            out_bill_no, state = str(result["out_bill_no"]), str(result["state"])
        except SignatureError as exc:
            raise NotificationRefused(400, str(exc)) from None
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise NotificationRefused(400, "malformed notification") from None
        if state not in STATES or state == "NEW":
            raise NotificationRefused(400, f"unknown state {state[:32]!r}")
        if str(result.get("mch_id", self._settings.mchid)) != self._settings.mchid:
            raise NotificationRefused(400, "another merchant's bill")
        bill = await payouts.bill(self._pg, out_bill_no)
        if bill is None:
            raise NotificationRefused(404, "no such bill")
        if (
            result.get("transfer_amount", bill.amount_fen) != bill.amount_fen
            or result.get("openid", bill.openid) != bill.openid
        ):
            log.error("notification for %s disagrees with the bill; ignored", out_bill_no)
            raise NotificationRefused(400, "notification disagrees with the bill")
        await payouts.advance(
            self._pg,
            out_bill_no,
            state,
            transfer_bill_no=_text(result.get("transfer_bill_no")),
            fail_reason=_text(result.get("fail_reason")),
        )


def _text(value: object) -> str | None:
    return None if value is None else str(value)
