"""WeChat Pay API v3 merchant transfer (商家转账, user-confirmation mode) over aiohttp.

Every request is signed; every answer is verified before it is believed. An answer that
cannot be trusted (time-out, dropped connection, 5xx, bad signature) is ``Unclear``: the
bill may or may not exist, and only a query under the same out_bill_no can tell.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from app.payout.ratelimit import SharedLimit
from app.payout.wechatpay import (
    ApiV3Cipher,
    MerchantSigner,
    PlatformVerifier,
    SignatureError,
    load_private,
    load_public,
)
from app.settings import PayoutSettings

BILLS_PATH = "/v3/fund-app/mch-transfer/transfer-bills"


class Unclear(Exception):
    """The call's outcome is unknown; resolve it by querying the same out_bill_no."""


class Refused(Exception):
    """WeChat Pay answered with a definite, signed error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def signer_of(settings: PayoutSettings) -> MerchantSigner:
    """The merchant signer the settings describe."""
    return MerchantSigner(
        settings.mchid, settings.merchant_serial, load_private(settings.merchant_key_pem)
    )


def verifier_of(settings: PayoutSettings) -> PlatformVerifier:
    """The platform verifier the settings describe."""
    return PlatformVerifier(settings.platform_key_id, load_public(settings.platform_key_pem))


def cipher_of(settings: PayoutSettings) -> ApiV3Cipher:
    """The notification cipher the settings describe."""
    return ApiV3Cipher(settings.apiv3_key)


class WeChatPayClient:
    """Create, query and cancel transfer bills, each call within the shared rate limit."""

    def __init__(
        self, http: aiohttp.ClientSession, settings: PayoutSettings, limit: SharedLimit
    ) -> None:
        self._http = http
        self._settings = settings
        self._signer = signer_of(settings)
        self._verifier = verifier_of(settings)
        self._limit = limit
        self._timeout = aiohttp.ClientTimeout(total=settings.http_timeout_s)

    async def create(
        self, out_bill_no: str, openid: str, amount_fen: int, activity: str
    ) -> dict[str, Any]:
        """POST a transfer bill (the same number again answers the same bill)."""
        s = self._settings
        body = {
            "appid": s.appid,
            "out_bill_no": out_bill_no,
            "transfer_scene_id": s.scene_id,
            "openid": openid,
            "transfer_amount": amount_fen,
            "transfer_remark": s.remark,
            "notify_url": s.notify_url,
            "user_recv_perception": s.perception,
            "transfer_scene_report_infos": [
                {"info_type": "活动名称", "info_content": activity[:32] or s.remark},
                {"info_type": "奖励说明", "info_content": s.remark},
            ],
        }
        return await self._call("create", "POST", BILLS_PATH, body)

    async def query(self, out_bill_no: str) -> dict[str, Any] | None:
        """The bill as WeChat Pay knows it, or None when it has no such bill."""
        try:
            return await self._call("query", "GET", f"{BILLS_PATH}/out-bill-no/{out_bill_no}")
        except Refused as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise

    async def cancel(self, out_bill_no: str) -> dict[str, Any]:
        """Cancel a bill still waiting for the player (answers CANCELING or CANCELLED)."""
        return await self._call(
            "cancel", "POST", f"{BILLS_PATH}/out-bill-no/{out_bill_no}/cancel", {}
        )

    async def _call(
        self, kind: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        await self._limit.acquire(kind)
        text = "" if body is None else orjson.dumps(body).decode()
        headers = {
            "Authorization": self._signer.authorization(method, path, text),
            "Accept": "application/json",
            "Wechatpay-Serial": self._verifier.key_id,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._http.request(
                method,
                self._settings.api_base + path,
                data=text.encode() if body is not None else None,
                headers=headers,
                timeout=self._timeout,
            ) as resp:
                status, answer = resp.status, await resp.text()
                signed = resp.headers.copy()  # case-insensitive, as HTTP headers are
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unclear(f"{method} {path}: {exc!r}") from None
        if status >= 500:
            raise Unclear(f"{method} {path}: HTTP {status}")
        try:
            self._verifier.check(signed, answer)
        except SignatureError as exc:
            raise Unclear(f"{method} {path}: unverified answer ({exc})") from None
        try:
            parsed = orjson.loads(answer) if answer else {}
        except orjson.JSONDecodeError:
            raise Unclear(f"{method} {path}: answer is not JSON") from None
        if not isinstance(parsed, dict):
            raise Unclear(f"{method} {path}: answer is not an object")
        if status >= 400:
            raise Refused(status, str(parsed.get("code", "")), str(parsed.get("message", "")))
        return parsed


@contextlib.asynccontextmanager
async def open_client(
    redis: Redis, settings: PayoutSettings
) -> AsyncIterator[WeChatPayClient | None]:
    """A client for one command's duration (None when payouts are not configured)."""
    if not settings.enabled:
        yield None
        return
    limit = SharedLimit(redis, settings.rate_per_s)
    async with aiohttp.ClientSession() as http:
        yield WeChatPayClient(http, settings, limit)
