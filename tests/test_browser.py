"""End to end in headless Chromium: real worker processes, the fake WeChat, the H5 page.

Debian's chromium (/usr/bin/chromium, installed by .ci/run) is driven by Playwright's
async API; Playwright's own browser download is never used.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from redis.asyncio import Redis

from app.local.embedded import free_port
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN, ADMIN_TOKEN

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ROOT = Path(__file__).resolve().parent.parent
READY_WITHIN_S = 60


@dataclass
class Service:
    """The running service as a player's browser sees it."""

    base: str
    procs: list[subprocess.Popen[bytes]]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def service(redis_url: str, database_url: str, clean: None) -> Iterator[Service]:
    """The fake WeChat and two worker processes on free ports, stopped afterwards."""
    port, fake_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        ADMIN_TOKEN=ADMIN_TOKEN,
        HOST="127.0.0.1",
        PORT=str(port),
        INSECURE_COOKIES="1",
        WECHAT_APPID="wxe2e0000000000",
        WECHAT_SECRET="e2e-secret-0123456789",
        WECHAT_AUTHORIZE_URL=f"http://127.0.0.1:{fake_port}/connect/oauth2/authorize",
        WECHAT_API_BASE=f"http://127.0.0.1:{fake_port}",
        PUBLIC_BASE_URL=base,
    )
    python = [sys.executable, "-m", "app"]
    procs = [
        subprocess.Popen([*python, "fake-wechat", "--port", str(fake_port)], env=env, cwd=ROOT)
    ]
    try:
        procs += [subprocess.Popen([*python, "worker"], env=env, cwd=ROOT) for _ in range(2)]
        yield Service(base, procs)
    finally:
        _stop(procs)


async def _ready(service: Service) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_WITHIN_S
    async with aiohttp.ClientSession() as http:
        while True:
            dead = [p.args for p in service.procs if p.poll() is not None]
            assert not dead, f"exited during start-up: {dead}"
            try:
                async with http.get(f"{service.base}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert loop.time() < deadline, "the workers did not become ready"
            await asyncio.sleep(0.2)


async def _create_campaign(service: Service, **fields: object) -> str:
    body = {"kind": "red_packet", "name": "新春红包", "total_fen": 8_888, "count": 8} | fields
    return await _create(service, body)


async def _create(service: Service, body: dict[str, object]) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{service.base}/api/admin/campaigns", json=body, headers=ADMIN) as resp,
    ):
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["id"])


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium; its absence is a failure, never a skip."""
    assert Path(CHROMIUM).exists(), "apt-get install chromium (.ci/run does)"
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


async def settled(page: Page) -> None:
    """Wait for the envelope's animations to finish (for a faithful screenshot)."""
    # evaluate (unlike wait_for_function) is not subject to the page's CSP.
    await page.evaluate("() => Promise.all(document.getAnimations().map(a => a.finished))")


async def _phone(browser: Browser) -> Page:
    context = await browser.new_context(
        viewport={"width": 375, "height": 667},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        locale="zh-CN",
    )
    return await context.new_page()


async def test_login_grab_reload_in_chromium(
    service: Service, browser: Browser, redis_url: str
) -> None:
    await _ready(service)
    # One envelope of 1,234.05 yuan: thousands separator and a zero-padded fen part.
    cid = await _create_campaign(service, total_fen=123_405, count=1)
    page = await _phone(browser)
    ARTIFACTS.mkdir(exist_ok=True)

    await page.goto(f"{service.base}/c/{cid}")
    await expect(page.locator("#name")).to_have_text("新春红包")
    action = page.locator("#action")
    await expect(action).to_have_text("微信登录 抢红包")
    await page.screenshot(path=ARTIFACTS / "h5-1-before-login.png")

    # Through the fake WeChat's consent page, as a player would.
    await action.click()
    await page.wait_for_url("**/connect/oauth2/authorize**")
    await page.fill("#openid", "e2e-player")
    await page.get_by_role("button", name="同意").click()
    await page.wait_for_url(f"{service.base}/c/{cid}")
    await expect(action).to_have_text("開")
    await expect(page.locator("#account")).to_contain_text("已登录")

    await action.click()
    amount = page.locator("#amount")
    await expect(amount).to_be_visible()
    await expect(page.locator("#result-title")).to_have_text("恭喜发财")
    redis = Redis.from_url(redis_url)
    try:
        won = await redis.hget(CampaignKeys.of(cid).winners, "e2e-player")
    finally:
        await redis.aclose()
    assert won is not None
    fen = int(won.split(b":")[1])
    assert fen == 123_405
    await expect(amount).to_have_text("1,234.05")
    await settled(page)
    await page.screenshot(path=ARTIFACTS / "h5-2-won.png")

    await page.reload()
    await expect(page.locator("#result-title")).to_have_text("你已抢到红包")
    await expect(amount).to_have_text("1,234.05")
    await expect(action).to_be_hidden()
    await settled(page)
    await page.screenshot(path=ARTIFACTS / "h5-3-already-won.png")


async def test_countdown_refusal_snapshot_in_chromium(service: Service, browser: Browser) -> None:
    await _ready(service)
    starts = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    later = await _create_campaign(service, starts_at=starts)
    page = await _phone(browser)
    ARTIFACTS.mkdir(exist_ok=True)

    await page.goto(f"{service.base}/c/{later}")
    await expect(page.locator("#status")).to_have_text("距开始还有")
    await expect(page.locator("#countdown")).to_have_text(re.compile(r"^0[12]:[0-5]\d:[0-5]\d$"))
    await expect(page.locator("#action")).to_be_disabled()
    await page.screenshot(path=ARTIFACTS / "h5-4-countdown.png")

    now = await _create_campaign(service)
    await page.goto(f"{service.base}/c/{now}")
    await page.locator("#action").click()
    await page.get_by_role("button", name="拒绝").click()
    await page.wait_for_url(f"{service.base}/c/{now}")
    await expect(page.locator("#toast")).to_have_text("你取消了微信授权，登录后才能参与")
    await expect(page.locator("#action")).to_have_text("微信登录 抢红包")
    await page.screenshot(path=ARTIFACTS / "h5-5-refused.png")

    # A snapshot-page visitor may log in and look, but the grab is refused with a reason.
    await page.locator("#action").click()
    await page.check("input[name=fake_snapshot]")
    await page.get_by_role("button", name="同意").click()
    await page.wait_for_url(f"{service.base}/c/{now}")
    await page.locator("#action").click()
    await expect(page.locator("#toast")).to_contain_text("使用完整服务")
    await expect(page.locator("#amount")).to_be_hidden()
    await page.screenshot(path=ARTIFACTS / "h5-6-snapshot-user.png")


async def _log_in(page: Page, base: str, cid: str, openid: str) -> None:
    """Through the fake WeChat's consent page, as a player would."""
    await page.locator("#action").click()
    await page.wait_for_url("**/connect/oauth2/authorize**")
    await page.fill("#openid", openid)
    await page.get_by_role("button", name="同意").click()
    await page.wait_for_url(f"{base}/c/{cid}")


async def test_lottery_draw_prize_then_quota_in_chromium(
    service: Service, browser: Browser, redis_url: str, database_url: str
) -> None:
    await _ready(service)
    # One prize, the only outcome with weight: the first draw wins it; one draw per player.
    cid = await _create(
        service,
        {
            "kind": "lottery",
            "name": "财神到",
            "tiers": [{"name": "金元宝", "stock": 1, "weight": 1, "value_fen": 88_800}],
            "no_prize_weight": 0,
            "quota_total": 1,
        },
    )
    page = await _phone(browser)
    ARTIFACTS.mkdir(exist_ok=True)

    await page.goto(f"{service.base}/c/{cid}")
    await expect(page.locator("#name")).to_have_text("财神到")
    action = page.locator("#action")
    await expect(action).to_have_text("微信登录 去抽奖")
    await _log_in(page, service.base, cid, "e2e-lucky")
    await expect(action).to_have_text("抽")
    await expect(page.locator("#status")).to_have_text("还可以抽 1 次")
    await page.screenshot(path=ARTIFACTS / "h5-7-lottery-ready.png")

    await action.click()
    await expect(page.locator("#result-title")).to_have_text("恭喜抽中 金元宝")
    await expect(page.locator("#amount")).to_have_text("888.00")
    await expect(page.locator("#result-note")).to_have_text("你的抽奖次数已用完，感谢参与")
    await expect(action).to_be_hidden()
    await settled(page)
    await page.screenshot(path=ARTIFACTS / "h5-8-lottery-prize.png")

    await page.reload()
    await expect(page.locator("#result-title")).to_have_text("你已抽中 金元宝")
    await expect(page.locator("#amount")).to_have_text("888.00")
    await expect(page.locator("#result-note")).to_have_text("你的抽奖次数已用完，感谢参与")
    await expect(action).to_be_hidden()
    await settled(page)
    await page.screenshot(path=ARTIFACTS / "h5-9-lottery-quota-used.png")

    # With two draws, the prize leaves the button for the second, which finds nothing left.
    twice = await _create(
        service,
        {
            "kind": "lottery",
            "name": "好运来",
            "tiers": [{"name": "福袋", "stock": 1, "weight": 1, "value_fen": None}],
            "no_prize_weight": 0,
            "quota_total": 2,
        },
    )
    await page.goto(f"{service.base}/c/{twice}")
    await expect(page.locator("#status")).to_have_text("还可以抽 2 次")
    await action.click()
    await expect(page.locator("#result-title")).to_have_text("恭喜抽中 福袋")
    await expect(page.locator("#result-amount")).to_be_hidden()
    await expect(page.locator("#status")).to_have_text("还可以抽 1 次")
    await expect(action).to_be_enabled()
    await settled(page)
    await page.screenshot(path=ARTIFACTS / "h5-10-lottery-again.png")
    await action.click()
    await expect(page.locator("#result-title")).to_have_text("谢谢参与")
    await expect(page.locator("#result-note")).to_have_text("你的抽奖次数已用完，感谢参与")
    await expect(action).to_be_hidden()
    await settled(page)
    await page.screenshot(path=ARTIFACTS / "h5-11-lottery-no-prize.png")

    # The service says the same: one more draw is refused, and the prize was counted once.
    status = await page.evaluate(
        """async (path) => {
            const r = await fetch(path, {method: 'POST', headers: {'X-Requested-With': 'hongbao'}});
            return [r.status, (await r.json()).error];
        }""",
        f"/api/campaigns/{cid}/draw",
    )
    assert status == [429, "quota_exhausted"]
    keys = CampaignKeys.of(cid)
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.hget(keys.tiers, "won:0") == b"1"
        assert await redis.hgetall(keys.draws) == {b"e2e-lucky": b"1"}
        assert await redis.hgetall(keys.wins) == {b"e2e-lucky": b"1:0,"}
        deadline = asyncio.get_running_loop().time() + 30
        while await redis.xlen(keys.ledger):
            assert asyncio.get_running_loop().time() < deadline, "the draw was not drained"
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT openid, draw_no, tier, value_fen FROM draws WHERE campaign_id = $1", cid
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("e2e-lucky", 1, 0, 88_800)]
