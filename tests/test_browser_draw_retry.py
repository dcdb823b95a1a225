"""The H5 page's draw retry in headless Chromium: a lost reply never draws twice.

The first draw request reaches the real worker, which draws; the browser is then told the
connection failed (Playwright fetches the response and aborts the request), as on a
phone that lost its network at the wrong moment. The player taps again: the page sends
the same Idempotency-Key, and shows the draw already made. A later tap is a new draw.
"""

from __future__ import annotations

import pytest
from playwright.async_api import Browser, Route, expect
from redis.asyncio import Redis

from app.store.scripts import CampaignKeys
from tests.test_browser import (
    Service,
    _create,
    _log_in,
    _phone,
    _ready,
    browser,
    chromium,
    service,
)

__all__ = ["browser", "chromium", "service"]  # fixtures, imported for this module's tests

pytestmark = pytest.mark.slow


async def test_the_retry_tap_after_a_lost_reply_shows_the_same_draw(
    service: Service, browser: Browser, redis_url: str
) -> None:
    await _ready(service)
    # The prize is the only outcome with weight while it lasts: the first draw wins it.
    cid = await _create(
        service,
        {
            "kind": "lottery",
            "name": "财神到",
            "tiers": [{"name": "金元宝", "stock": 1, "weight": 1, "value_fen": 88_800}],
            "no_prize_weight": 0,
            "quota_total": 3,
        },
    )
    page = await _phone(browser)
    await page.goto(f"{service.base}/c/{cid}")
    await _log_in(page, service.base, cid, "e2e-unlucky-network")
    action = page.locator("#action")
    await expect(action).to_have_text("抽")

    keys: list[str | None] = []

    async def lose_first_reply(route: Route) -> None:
        keys.append(await route.request.header_value("Idempotency-Key"))
        if len(keys) == 1:
            await route.fetch()  # the worker draws...
            await route.abort("connectionreset")  # ...and the reply never arrives
        else:
            await route.continue_()

    await page.route("**/api/campaigns/*/draw", lose_first_reply)
    redis = Redis.from_url(redis_url)
    draws = CampaignKeys.of(cid).draws
    try:
        await action.click()
        await expect(page.locator("#toast")).to_contain_text("网络")
        await expect(action).to_be_enabled()
        assert await redis.hget(draws, "e2e-unlucky-network") == b"1"

        await action.click()
        await expect(page.locator("#result-title")).to_have_text("恭喜抽中 金元宝")
        assert await redis.hget(draws, "e2e-unlucky-network") == b"1"
        assert len(keys) == 2
        assert keys[0]
        assert keys[0] == keys[1]

        await expect(action).to_be_enabled()
        await action.click()
        await expect(page.locator("#result-title")).to_have_text("谢谢参与")
        assert await redis.hget(draws, "e2e-unlucky-network") == b"2"
        assert len(keys) == 3
        assert keys[2]
        assert keys[2] != keys[0]
    finally:
        await redis.aclose()
