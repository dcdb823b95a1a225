"""End to end in headless Chromium: real worker processes, the fake WeChat, the H5 page.

Debian's chromium (/usr/bin/chromium, installed by ./hb test: scripts/system-packages) is
driven by Playwright's async API; Playwright's own browser download is never used.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from redis.asyncio import Redis

from app.local.embedded import free_port
from app.local.fakewechatpay import provision
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
    assert Path(CHROMIUM).exists(), "apt-get install chromium (./hb test does)"
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


# Amount-coloured pixels (#c9302c) differ from the flap's (#e25b4f) by ~60 in RGB distance.
AMOUNT_RGB = (201, 48, 44)
NEAR_AMOUNT = 24
SLOW_MOTION = 0.5
MIN_TAP_PX = 44

# Geometry of one frozen frame: the flap's box, the amount's box (when shown), and how
# opaque the result that holds the amount is at this instant.
FRAME_JS = """() => {
    const box = (el) => { const r = el.getBoundingClientRect();
        return {x: r.x, y: r.y, width: r.width, height: r.height}; };
    const amount = document.getElementById('result-amount');
    const shown = !amount.closest('[hidden]') && amount.getClientRects().length > 0;
    return {
        flap: box(document.querySelector('.packet__flap')),
        amount: shown ? box(amount) : null,
        opacity: parseFloat(getComputedStyle(document.getElementById('result')).opacity),
        opened: document.getElementById('stage').hasAttribute('data-opened'),
        running: document.getAnimations().filter(a => a.playState === 'running').length,
    };
}"""

# Counts pixels near ``rgb`` in a PNG, decoded by the browser itself (on about:blank).
COUNT_PIXELS_JS = """async ([b64, rgb, near]) => {
    const img = new Image();
    img.src = 'data:image/png;base64,' + b64;
    await img.decode();
    const canvas = document.createElement('canvas');
    canvas.width = img.width; canvas.height = img.height;
    const ctx = canvas.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, img.width, img.height).data;
    let count = 0;
    for (let i = 0; i < data.length; i += 4) {
        const d = Math.hypot(data[i] - rgb[0], data[i + 1] - rgb[1], data[i + 2] - rgb[2]);
        if (d < near) count += 1;
    }
    return count;
}"""


def _overlap(a: dict[str, float], b: dict[str, float]) -> dict[str, float] | None:
    x, y = max(a["x"], b["x"]), max(a["y"], b["y"])
    right = min(a["x"] + a["width"], b["x"] + b["width"])
    bottom = min(a["y"] + a["height"], b["y"] + b["height"])
    if right - x < 1 or bottom - y < 1:
        return None
    return {"x": x, "y": y, "width": right - x, "height": bottom - y}


async def _small_tap_targets(page: Page) -> list[str]:
    """Visible buttons and links smaller than MIN_TAP_PX in either direction."""
    boxes = await page.evaluate(
        """() => [...document.querySelectorAll('button, a, [role=button]')]
            .filter(el => el.getClientRects().length > 0)
            .map(el => { const r = el.getBoundingClientRect();
                return [el.textContent.trim(), r.width, r.height]; })"""
    )
    assert boxes, "no tap target on the page"
    return [f"{t!r} {w:.0f}x{h:.0f}" for t, w, h in boxes if min(w, h) < MIN_TAP_PX]


async def test_opening_reveals_the_amount_only_past_the_flap(
    service: Service, browser: Browser, redis_url: str
) -> None:
    await _ready(service)
    cid = await _create_campaign(service, total_fen=66_600, count=1)
    page = await _phone(browser)
    analyser = await page.context.new_page()
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("h5-open-*.png"):
        old.unlink()
    await page.goto(f"{service.base}/c/{cid}")
    assert await _small_tap_targets(page) == []
    await _log_in(page, service.base, cid, "e2e-opener")
    await expect(page.locator("#action")).to_have_text("開")
    # Logged in: the 開 button and the logout button both at least 44x44.
    assert await _small_tap_targets(page) == []

    # Slow the page's animations down and freeze them for each frame of the sequence.
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Animation.enable")
    await cdp.send("Animation.setPlaybackRate", {"playbackRate": SLOW_MOTION})
    await page.locator("#action").click()
    frames: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + 90
    while True:
        await cdp.send("Animation.setPlaybackRate", {"playbackRate": 0})
        frame = await page.evaluate(FRAME_JS)
        n = len(frames)
        await page.screenshot(path=ARTIFACTS / f"h5-open-{n:02d}.png", scale="css")
        over = frame["amount"] and _overlap(frame["flap"], frame["amount"])
        if over:
            # Where the amount's box meets the flap, nothing of the amount is drawn yet.
            assert frame["opacity"] == 0, f"frame {n}: amount at opacity {frame['opacity']}"
            clip = base64.b64encode(await page.screenshot(clip=over, scale="css")).decode()
            near = await analyser.evaluate(COUNT_PIXELS_JS, [clip, AMOUNT_RGB, NEAR_AMOUNT])
            assert near == 0, f"frame {n}: {near} amount-coloured pixels over the flap"
        frame["over"] = bool(over)
        frames.append(frame)
        await cdp.send("Animation.setPlaybackRate", {"playbackRate": SLOW_MOTION})
        if frame["opened"] and not frame["running"] and frame["opacity"] == 1:
            break
        assert asyncio.get_running_loop().time() < deadline, "the envelope never opened"
        await asyncio.sleep(0.1)

    # The sequence really shows the opening: frames with the flap on its way up, and
    # some with the amount's box still under it.
    assert len({round(f["flap"]["y"]) for f in frames if f["opened"]}) >= 3, frames
    assert any(f["over"] for f in frames), "no frame caught the amount under the moving flap"
    final = frames[-1]
    assert final["amount"] is not None
    assert _overlap(final["flap"], final["amount"]) is None
    # The last frame shows the amount, in its own colour, clear of the flap.
    amount_shot = await page.locator("#amount").screenshot()
    assert await analyser.evaluate(
        COUNT_PIXELS_JS, [base64.b64encode(amount_shot).decode(), AMOUNT_RGB, NEAR_AMOUNT]
    )
    await expect(page.locator("#amount")).to_have_text("666.00")
    assert await _small_tap_targets(page) == []
    redis = Redis.from_url(redis_url)
    try:
        won = await redis.hget(CampaignKeys.of(cid).winners, "e2e-opener")
    finally:
        await redis.aclose()
    assert won is not None
    assert int(won.split(b":")[1]) == 66_600


async def test_home_page_and_favicon(service: Service, browser: Browser) -> None:
    await _ready(service)
    page = await _phone(browser)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.goto(f"{service.base}/")
    await expect(page.locator("#name")).to_have_text("欢迎来抢红包")
    await expect(page.locator("#action")).to_be_hidden()
    text = await page.locator("body").inner_text()
    # Written for players: no developer hint about URL shapes.
    for hint in ("/c/", "链接形如", "活动编号"):
        assert hint not in text, text
    await settled(page)
    await page.screenshot(path=ARTIFACTS / "h5-12-home.png")

    icon = await page.request.get(f"{service.base}/favicon.ico")
    assert icon.status == 200
    assert icon.headers["content-type"] == "image/x-icon"
    assert "max-age=" in icon.headers["cache-control"]
    body = await icon.body()
    assert body[:4] == b"\x00\x00\x01\x00"  # an ICO file
    assert await page.locator("link[rel=icon]").get_attribute("href") == "/favicon.ico"
    # The browser itself decodes it as an image.
    size = await page.evaluate(
        """async () => { const img = new Image(); img.src = '/favicon.ico';
            await img.decode(); return [img.naturalWidth, img.naturalHeight]; }"""
    )
    assert min(size) >= 16


@pytest.fixture
def paying_service(
    redis_url: str, database_url: str, clean: None, tmp_path: Path
) -> Iterator[Service]:
    """A worker, the payout worker, the fake WeChat and the fake WeChat Pay (fresh keys)."""
    port, fake_port, pay_port = free_port(), free_port(), free_port()
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
        PAYOUT_POLL_S="1",
    )
    env.update(
        provision(
            tmp_path / "wechatpay",
            env["WECHAT_APPID"],
            f"http://127.0.0.1:{pay_port}",
            f"{base}/api/wechatpay/notify",
        )
    )
    python = [sys.executable, "-m", "app"]
    procs = [
        subprocess.Popen([*python, "fake-wechat", "--port", str(fake_port)], env=env, cwd=ROOT),
        subprocess.Popen([*python, "fake-wechatpay", "--port", str(pay_port)], env=env, cwd=ROOT),
    ]
    try:
        procs += [
            subprocess.Popen([*python, "worker"], env=env, cwd=ROOT),
            subprocess.Popen([*python, "payout"], env=env, cwd=ROOT),
        ]
        yield Service(base, procs)
    finally:
        _stop(procs)


async def test_win_claim_confirm_on_fake_wechatpay_then_paid_in_chromium(
    paying_service: Service, browser: Browser, database_url: str
) -> None:
    service = paying_service
    await _ready(service)
    cid = await _create_campaign(service, total_fen=888, count=1)
    page = await _phone(browser)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.goto(f"{service.base}/c/{cid}")
    await _log_in(page, service.base, cid, "e2e-payee")
    await page.locator("#action").click()
    await expect(page.locator("#amount")).to_have_text("8.88")
    state = page.locator("#payout-state")
    # Never 已到账 before WeChat Pay's SUCCESS: until the player confirms, 待领取.
    await expect(state).to_contain_text("待领取")
    claim = page.locator("#claim")
    await expect(claim).to_have_text("领取到微信零钱")
    await settled(page)
    await page.screenshot(path=ARTIFACTS / "h5-9-to-claim.png")
    conn = await asyncpg.connect(database_url)
    try:
        # The claim opens the confirmation once the worker has made the bill.
        for _ in range(100):
            await claim.click()
            try:
                await page.wait_for_url("**/fake/confirm?**", timeout=1000)
                break
            except Exception:  # still queued: the page said so in its toast
                await expect(state).to_contain_text("待领取")
        await expect(page.locator("#amount")).to_have_text("¥8.88")
        await page.screenshot(path=ARTIFACTS / "h5-10-fake-wechatpay-confirm.png")
        await page.get_by_role("button", name="确认收款").click()
        await page.wait_for_url(f"{service.base}/c/{cid}")
        await expect(state).to_have_text("已到账", timeout=15_000)
        await expect(claim).to_be_hidden()
        await settled(page)
        await page.screenshot(path=ARTIFACTS / "h5-11-paid.png")
        rows = await conn.fetch(
            "SELECT openid, amount_fen, state FROM payouts WHERE campaign_id = $1", cid
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("e2e-payee", 888, "SUCCESS")]
