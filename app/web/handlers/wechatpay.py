"""WeChat Pay's notifications: POST /api/wechatpay/notify.

WeChat Pay authenticates with its signature, not a cookie (the route is CSRF-exempt);
it expects 200/204 on success and, otherwise, a 4xx/5xx with ``{"code": "FAIL", ...}``,
after which it retries.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from app.payout.service import NotificationRefused
from app.web.keys import PAYOUTS

log = logging.getLogger("hongbao.payout")


async def notify(request: web.Request) -> web.Response:
    """POST /api/wechatpay/notify: verify, decrypt, apply (idempotent)."""
    body = await request.read()
    try:
        # Case-insensitive headers: a proxy (HAProxy) may pass their names in lower case.
        await request.app[PAYOUTS].notify(request.headers, body)
    except NotificationRefused as exc:
        log.warning("WeChat Pay notification refused: %s", exc.message)
        return web.Response(
            status=exc.status,
            body=orjson.dumps({"code": "FAIL", "message": exc.message}),
            content_type="application/json",
        )
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    """Register the notification route."""
    app.router.add_post("/api/wechatpay/notify", notify, name="wechatpay_notify")
