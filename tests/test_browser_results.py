"""The results on the H5 page, in headless Chromium (fixtures of tests/test_browser.py):
a finished red packet shows 手气最佳 and 看看大家的手气, a lottery its prize list."""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Browser, Page, expect
from redis.asyncio import Redis

from app.records import Envelope
from app.store.results import public_name
from app.store.scripts import CampaignKeys
from tests.test_browser import (
    ARTIFACTS,
    Service,
    _create,
    _log_in,
    _phone,
    _ready,
    _small_tap_targets,
    browser,
    chromium,
    service,
    settled,
)

__all__ = ["browser", "chromium", "service"]  # fixtures, imported for this module's tests

pytestmark = pytest.mark.slow


async def _grab_as(browser: Browser, service: Service, cid: str, openid: str) -> Page:
    page = await _phone(browser)
    await page.goto(f"{service.base}/c/{cid}")
    await _log_in(page, service.base, cid, openid)
    await page.locator("#action").click()
    await expect(page.locator("#result-title")).to_have_text("恭喜发财")
    return page


async def test_sold_out_red_packet_shows_best_luck_and_everyones(
    service: Service, browser: Browser, redis_url: str
) -> None:
    await _ready(service)
    cid = await _create(
        service, {"kind": "red_packet", "name": "拼手气红包", "total_fen": 1_000, "count": 3}
    )
    players = ["wx-alice01", "wx-bob0002", "wx-carol03"]
    pages = [await _grab_as(browser, service, cid, openid) for openid in players]
    # Still open for the first two players' pages: no results shown there.
    await expect(pages[0].locator("#luck")).to_be_hidden()

    redis = Redis.from_url(redis_url)
    try:
        raw = await redis.hgetall(CampaignKeys.of(cid).winners)
    finally:
        await redis.aclose()
    won = {k.decode(): Envelope.decode(v).amount_fen for k, v in raw.items()}
    assert sum(won.values()) == 1_000
    top = max(won.values())
    best = next(p for p in players if won[p] == top)

    # The last winner reloads the sold-out packet; a latecomer opens it.
    page = pages[-1]
    await page.reload()
    await expect(page.locator("#result-title")).to_have_text("你已抢到红包")
    luck = page.locator("#luck")
    await expect(luck).to_be_visible(timeout=30_000)
    await expect(page.locator("#best-name")).to_have_text(public_name(best))
    await expect(page.locator("#best-amount")).to_have_text(f"{top // 100}.{top % 100:02d}")
    rows = page.locator("#luck-list li")
    await expect(rows).to_have_count(3)
    # Latest first, each with its amount; the best one carries the badge.
    for row, openid in zip(await rows.all(), reversed(players), strict=True):
        await expect(row.locator(".board__name")).to_have_text(public_name(openid))
        fen = won[openid]
        await expect(row.locator(".board__value")).to_contain_text(
            f"{fen // 100}.{fen % 100:02d} 元"
        )
    await expect(page.locator(".board__badge")).to_have_count(1)
    await expect(page.locator(".board__badge")).to_have_text("手气最佳")
    await expect(page.locator("#luck-summary")).to_have_text("已领取 3/3 个，共 10.00/10.00 元")
    await expect(page.locator("#foot")).to_have_text("拼手气红包 · 每人限抢一次 · 先到先得")
    text = await luck.inner_text()
    assert all(openid not in text for openid in players), text
    assert await _small_tap_targets(page) == []
    await settled(page)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "h5-13-best-luck.png", full_page=True)

    late = await _phone(browser)
    await late.goto(f"{service.base}/c/{cid}")
    await expect(late.locator("#result-title")).to_have_text("手慢了，红包派完了")
    await expect(late.locator("#best-name")).to_have_text(public_name(best))
    await expect(late.locator("#luck-list li")).to_have_count(3)
    await settled(late)
    await late.screenshot(path=ARTIFACTS / "h5-14-sold-out-luck.png", full_page=True)

    # A fixed split says so (普通红包: every envelope the same).
    fixed = await _create(
        service,
        {"kind": "red_packet", "name": "普通红包", "total_fen": 600, "count": 2, "split": "fixed"},
    )
    await late.goto(f"{service.base}/c/{fixed}")
    await expect(late.locator("#foot")).to_have_text("普通红包 · 每人限抢一次 · 先到先得")


async def test_lottery_page_shows_its_prize_list(service: Service, browser: Browser) -> None:
    await _ready(service)
    cid = await _create(
        service,
        {
            "kind": "lottery",
            "name": "财神到",
            "tiers": [
                {"name": "金元宝", "stock": 2, "weight": 1, "value_fen": 88_800},
                {"name": "福袋", "stock": 5, "weight": 0, "value_fen": None},
            ],
            "no_prize_weight": 0,
            "quota_total": 1,
        },
    )
    page = await _phone(browser)
    await page.goto(f"{service.base}/c/{cid}")
    prizes = page.locator("#prize-list li")
    await expect(prizes).to_have_count(2)
    await expect(prizes.nth(0)).to_contain_text("金元宝")
    await expect(prizes.nth(0)).to_contain_text("888.00 元")
    await expect(prizes.nth(0)).to_contain_text("已抽中 0/2")
    await expect(prizes.nth(1)).to_contain_text("福袋")
    await expect(prizes.nth(1)).to_contain_text("已抽中 0/5")
    await expect(page.locator("#prize-winners-title")).to_be_hidden()

    await _log_in(page, service.base, cid, "wx-lucky-01")
    await page.locator("#action").click()
    await expect(page.locator("#result-title")).to_have_text("恭喜抽中 金元宝")
    # The list follows the ledger, recounted every few seconds: reload until it shows.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while "已抽中 1/2" not in await prizes.nth(0).inner_text():
        assert loop.time() < deadline, await prizes.nth(0).inner_text()
        await asyncio.sleep(1)
        await page.reload()
        await expect(prizes).to_have_count(2)
    winners = page.locator("#prize-winners li")
    await expect(winners).to_have_count(1)
    await expect(winners.nth(0).locator(".board__name")).to_have_text(public_name("wx-lucky-01"))
    await expect(winners.nth(0).locator(".board__value")).to_have_text("金元宝")
    assert await _small_tap_targets(page) == []
    await settled(page)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "h5-15-lottery-prizes.png", full_page=True)
