"""The operators' console (/admin) in headless Chromium, against real worker processes.

Launched exactly as tests/test_browser.py launches Debian's Chromium. An operator signs in
with the token, creates a campaign with a bad field (the 422 shows next to that field)
then a good one, watches its counters move while players grab in the background, pauses
it (grabs then answer 409 paused), ends it, and downloads the winners' CSV: its amounts
sum to the stats' won_fen, one row per winner the players were told of. Screenshots,
desktop and phone, go to test-artifacts/ (admin-*.png) with the CSV.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, expect

from app.local.embedded import free_port
from tests.conftest import ADMIN, ADMIN_TOKEN, PAGE, worker_env
from tests.test_browser import (
    ARTIFACTS,
    ROOT,
    Service,
    _log_in,
    _phone,
    _ready,
    _small_tap_targets,
    _stop,
    browser,
    chromium,
    paying_service,
)

__all__ = ["browser", "chromium", "paying_service"]  # fixtures, for this module's tests

pytestmark = pytest.mark.slow

ENVELOPES = 5_000
BUDGET_FEN = 2_000_000  # 20,000 yuan


@pytest.fixture
def console_service(redis_url: str, database_url: str, clean: None) -> Iterator[Service]:
    """Two worker processes on one port (as tests/test_browser.py runs them), dev-login on."""
    port = free_port()
    env = worker_env(redis_url, database_url, port)
    procs = [
        subprocess.Popen([sys.executable, "-m", "app", "worker"], env=env, cwd=ROOT)
        for _ in range(2)
    ]
    try:
        yield Service(f"http://127.0.0.1:{port}", procs)
    finally:
        _stop(procs)


@dataclass(frozen=True, slots=True)
class Told:
    """One grab and what the player was told."""

    openid: str
    sent: float
    status: int
    body: dict[str, Any]


async def _login(http: aiohttp.ClientSession, base: str, openid: str) -> str:
    """dev-login as ``openid``: the Cookie header of its session."""
    async with http.post(f"{base}/auth/dev-login", json={"openid": openid}, headers=PAGE) as resp:
        assert resp.status == 200, await resp.text()
        return f"hb_session={resp.cookies['hb_session'].value}"


async def _each_once(base: str, cid: str, action: str, openids: list[str]) -> list[str]:
    """Each player logs in and makes one ``action`` (grab, draw): the results, in order."""
    results = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for openid in openids:
            cookie = await _login(http, base, openid)
            async with http.post(
                f"{base}/api/campaigns/{cid}/{action}", headers={**PAGE, "Cookie": cookie}
            ) as resp:
                assert resp.status == 200, await resp.text()
                results.append(str((await resp.json())["result"]))
    return results


async def _grabbing(
    base: str, cid: str, prefix: str, stop: asyncio.Event, told: list[Told]
) -> None:
    """New players, one after another: dev-login, then one grab each, until ``stop``."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        n = 0
        while not stop.is_set():
            openid = f"{prefix}-{n}"
            n += 1
            cookie = await _login(http, base, openid)
            sent = loop.time()
            async with http.post(
                f"{base}/api/campaigns/{cid}/grab", headers={**PAGE, "Cookie": cookie}
            ) as resp:
                told.append(Told(openid, sent, resp.status, await resp.json()))
            await asyncio.sleep(0.02)


async def _stats(base: str, cid: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base}/api/admin/campaigns/{cid}", headers=ADMIN) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


class Watched:
    """The page's JavaScript errors and CSP violations (there must be none)."""

    def __init__(self, page: Page) -> None:
        self.problems: list[str] = []
        page.on("pageerror", lambda exc: self.problems.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        # Chromium logs every 4xx answer as "Failed to load resource": those are expected.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.problems.append(f"console: {message.text}")


async def _sign_in(page: Page, base: str) -> None:
    await page.goto(f"{base}/admin")
    await expect(page.locator("#view-signin")).to_be_visible()
    await page.fill("#token", ADMIN_TOKEN)
    await page.locator("#signin").click()
    await expect(page.locator("#view-list")).to_be_visible()


async def _confirm(
    page: Page, action: str, shot: str | None = None, name: str = "新春红包"
) -> None:
    await page.locator(f"#act-{action}").click()
    dialog = page.locator("#confirm")
    await expect(dialog).to_be_visible()
    await expect(page.locator("#confirm-text")).to_contain_text(name)
    if shot:
        await page.screenshot(path=ARTIFACTS / shot)
    await page.locator("#confirm-ok").click()
    await expect(dialog).to_be_hidden()


async def test_console_create_watch_pause_end_export(
    console_service: Service, browser: Browser
) -> None:
    service = console_service
    await _ready(service)
    ARTIFACTS.mkdir(exist_ok=True)
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page = await context.new_page()
    watched = Watched(page)

    # A wrong token is refused on the sign-in form; the right one opens the list.
    await page.goto(f"{service.base}/admin")
    await expect(page.locator("#view-signin")).to_be_visible()
    await page.fill("#token", "not-the-token")
    await page.locator("#signin").click()
    await expect(page.locator("#token-error")).to_contain_text("令牌无效")
    assert await page.evaluate("() => sessionStorage.length") == 0
    await page.screenshot(path=ARTIFACTS / "admin-1-signin-refused.png")
    await page.fill("#token", ADMIN_TOKEN)
    await page.locator("#signin").click()
    await expect(page.locator("#view-list")).to_be_visible()
    await expect(page.locator("#list-empty")).to_be_visible()
    assert await page.evaluate("() => sessionStorage.getItem('hb-admin-token')") == ADMIN_TOKEN

    # A bad field: the 422 names total_fen, and the message sits in that field's box.
    await page.locator("#view-list a[href='#/new']").click()
    await expect(page.locator("#view-create")).to_be_visible()
    await page.fill("#f-name", "新春红包")
    await page.fill("#f-total_fen", "100")
    await page.fill("#f-count", str(ENVELOPES))
    await page.locator("#create").click()
    total_box = page.locator("[data-field='total_fen']")
    await expect(total_box.locator(".field__error")).not_to_be_empty()
    await expect(total_box).to_have_attribute("data-invalid", "")
    await expect(page.locator("[data-field='count'] .field__error")).to_be_hidden()
    await expect(page.locator("#f-total_fen")).to_be_focused()
    await page.screenshot(path=ARTIFACTS / "admin-2-field-error.png")

    # A lottery's tier field: the error lands on that tier's box (tiers[0].stock).
    await page.locator("#kind-lottery").check()
    await page.fill("[data-field='tiers[0].name'] input", "金元宝")
    await page.fill("[data-field='tiers[0].stock'] input", "-1")
    await page.locator("#create").click()
    stock_box = page.locator("[data-field='tiers[0].stock']")
    stock_error = stock_box.locator(".field__error")
    await expect(stock_error).not_to_be_empty()
    await expect(stock_box).to_have_attribute("data-invalid", "")
    await expect(page.locator("#form-error")).to_be_hidden()
    await page.screenshot(path=ARTIFACTS / "admin-3-tier-error.png")

    # The good one: 20,000 yuan in 5,000 envelopes, open now.
    await page.locator("#kind-red_packet").check()
    await expect(stock_error).to_be_hidden()
    await page.fill("#f-total_fen", str(BUDGET_FEN))
    await expect(page.locator("#yuan-total_fen")).to_contain_text("20,000.00")
    await page.locator("#create").click()
    await page.wait_for_url("**/admin#/c/*")
    cid = page.url.rsplit("/", 1)[1]
    await expect(page.locator("#live-name")).to_have_text("新春红包")
    await expect(page.locator("#live-state")).to_have_attribute("data-state", "open")
    await expect(page.locator("#kpi-won_count")).to_have_text(f"0 / {ENVELOPES:,}")

    # Players grab in the background: the console's counters and rate move by themselves.
    stop = asyncio.Event()
    told: list[Told] = []
    grabbers = [
        asyncio.create_task(_grabbing(service.base, cid, f"p{i}", stop, told)) for i in range(3)
    ]
    try:
        won = page.locator("#kpi-won_count")
        for _ in range(3):
            before = await won.text_content()
            await expect(won).not_to_have_text(before or "", timeout=10_000)
        await expect(page.locator("#chart-rate .chart__now")).not_to_have_text("0.0 /s")
        assert await page.locator("#chart-rate polyline").count() == 1
        assert await page.locator("#chart-remaining polyline").count() == 1
        await page.screenshot(path=ARTIFACTS / "admin-4-live.png", full_page=True)

        # Pause, confirmed: from then on every grab (on either worker) is 409 paused.
        await _confirm(page, "pause", "admin-5-confirm-pause.png")
        await expect(page.locator("#live-state")).to_have_attribute("data-state", "paused")
        paused_at = asyncio.get_running_loop().time()
        await expect(page.locator("#act-resume")).to_be_enabled()
        await expect(page.locator("#act-pause")).to_be_disabled()
        while sum(1 for t in told if t.sent > paused_at) < 20:
            await asyncio.sleep(0.05)
        after_pause = [(t.status, t.body.get("error")) for t in told if t.sent > paused_at]
        assert set(after_pause) == {(409, "paused")}, after_pause
        frozen = await won.text_content()
        await page.wait_for_timeout(1500)
        await expect(won).to_have_text(frozen or "")
        await page.screenshot(path=ARTIFACTS / "admin-6-paused.png", full_page=True)

        # End, confirmed: grabs are then 409 ended, and nothing can resume it.
        await _confirm(page, "end")
        await expect(page.locator("#live-state")).to_have_attribute("data-state", "ended")
        ended_at = asyncio.get_running_loop().time()
        for action in ("pause", "resume", "end"):
            await expect(page.locator(f"#act-{action}")).to_be_disabled()
        while sum(1 for t in told if t.sent > ended_at) < 10:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*grabbers)
    after_end = {(t.status, t.body.get("error")) for t in told if t.sent > ended_at}
    assert after_end == {(409, "ended")}, after_end

    # Once the ledger has caught up (the console shows the lag), the CSV holds every grant.
    await expect(page.locator("#kpi-ledger_lag")).to_have_text("0", timeout=30_000)
    await page.screenshot(path=ARTIFACTS / "admin-7-ended.png", full_page=True)
    async with page.expect_download() as download_info:
        await page.locator("#act-csv").click()
    download = await download_info.value
    assert download.suggested_filename == f"winners-{cid}.csv"
    await download.save_as(ARTIFACTS / "admin-winners.csv")
    text = (ARTIFACTS / "admin-winners.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0].split(",")[:3] == ["openid", "amount_fen", "granted_at"]

    stats = await _stats(service.base, cid)
    winners = {t.openid: t.body["amount_fen"] for t in told if t.body.get("result") == "won"}
    assert stats["state"] == "ended"
    assert len(winners) > 0
    assert sum(int(r["amount_fen"]) for r in rows) == stats["won_fen"]
    assert len(rows) == stats["won_count"] == len(winners)
    assert {r["openid"]: int(r["amount_fen"]) for r in rows} == winners
    assert sum(winners.values()) == stats["won_fen"]
    assert stats["won_fen"] + stats["remaining_fen"] == BUDGET_FEN
    # Ended with envelopes left: the close-out returned them, and the console says so.
    assert stats["won_fen"] + stats["refunded_fen"] == BUDGET_FEN
    assert stats["refunded_count"] == ENVELOPES - stats["won_count"]
    await expect(page.locator("#kpi-refunded_fen")).to_have_text(
        f"¥{stats['refunded_fen'] // 100:,}.{stats['refunded_fen'] % 100:02d}"
    )

    # Back in the list, the campaign shows as ended.
    await page.locator("#nav a[href='#/']").click()
    item = page.locator(f"#campaigns li[data-id='{cid}']")
    await expect(item.locator(".badge")).to_have_attribute("data-state", "ended")
    await page.screenshot(path=ARTIFACTS / "admin-8-list.png", full_page=True)

    # The audit log names who created, paused and ended it, newest first.
    await page.locator("#nav-audit").click()
    entries = page.locator("#audit li")
    await expect(entries.first).to_contain_text(f"POST /api/admin/campaigns/{cid}/end")
    texts = await entries.all_text_contents()
    for action in ("pause", "end"):
        assert any(f"admin (admin) POST /api/admin/campaigns/{cid}/{action}" in t for t in texts)
    assert any("POST /api/admin/campaigns" in t and "201" in t for t in texts), texts
    await page.screenshot(path=ARTIFACTS / "admin-8b-audit.png", full_page=True)
    assert watched.problems == []

    # On a phone: nothing wider than the screen, every tap target at least 44 px.
    phone = await browser.new_context(
        viewport={"width": 375, "height": 667},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        locale="zh-CN",
    )
    small = await phone.new_page()
    small_watched = Watched(small)
    await _sign_in(small, service.base)
    await expect(small.locator(f"#campaigns li[data-id='{cid}']")).to_be_visible()
    assert await _fits(small)
    assert await _small_tap_targets(small) == []
    await small.screenshot(path=ARTIFACTS / "admin-9-phone-list.png", full_page=True)
    await small.locator(f"#campaigns li[data-id='{cid}'] a").click()
    await expect(small.locator("#kpi-won_count")).to_have_text(
        f"{stats['won_count']:,} / {ENVELOPES:,}"
    )
    assert await _fits(small)
    assert await _small_tap_targets(small) == []
    await small.screenshot(path=ARTIFACTS / "admin-10-phone-live.png", full_page=True)
    await small.locator("#nav-new").click()
    await expect(small.locator("#view-create")).to_be_visible()
    assert await _fits(small)
    await small.screenshot(path=ARTIFACTS / "admin-11-phone-create.png", full_page=True)
    assert small_watched.problems == []
    await phone.close()
    await context.close()


async def _fits(page: Page) -> bool:
    """Whether the page is no wider than its viewport (no sideways scrolling)."""
    return bool(
        await page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    )


async def test_console_lottery_live_tier_stock(console_service: Service, browser: Browser) -> None:
    service = console_service
    await _ready(service)
    ARTIFACTS.mkdir(exist_ok=True)
    context = await browser.new_context(viewport={"width": 1100, "height": 900}, locale="zh-CN")
    page = await context.new_page()
    watched = Watched(page)
    await _sign_in(page, service.base)
    await page.locator("#view-list a[href='#/new']").click()
    await page.locator("#kind-lottery").check()
    await page.fill("#f-name", "财神到")
    await page.fill("[data-field='tiers[0].name'] input", "金元宝")
    await page.fill("[data-field='tiers[0].stock'] input", "3")
    await page.fill("[data-field='tiers[0].value_fen'] input", "888")
    await page.locator("#add-tier").click()
    await page.fill("[data-field='tiers[1].name'] input", "福袋")
    await page.fill("[data-field='tiers[1].stock'] input", "50")
    await page.fill("#f-no_prize_weight", "0")
    await page.locator("#create").click()
    await page.wait_for_url("**/admin#/c/*")
    cid = page.url.rsplit("/", 1)[1]
    await expect(page.locator("#live-state")).to_have_attribute("data-state", "open")
    await expect(page.locator("#chart-tiers")).to_be_visible()
    await expect(page.locator("#chart-remaining .chart__now")).to_have_text("53")

    # Ten players draw once each: every draw wins (no-prize weight 0), the stock goes down.
    drawn = await _each_once(service.base, cid, "draw", [f"d{n}" for n in range(10)])
    assert drawn == ["prize"] * 10
    await expect(page.locator("#kpi-draws")).to_have_text("10")
    await expect(page.locator("#kpi-prizes_won")).to_have_text("10")
    await expect(page.locator("#chart-remaining .chart__now")).to_have_text("43")
    stats = await _stats(service.base, cid)
    assert sum(t["won"] for t in stats["tiers"]) == 10
    # One bar per tier, its won part drawn.
    assert await page.locator("#chart-tiers .bar__track").count() == 2
    assert await page.locator("#chart-tiers .bar--won").count() == sum(
        1 for t in stats["tiers"] if t["won"]
    )
    await page.screenshot(path=ARTIFACTS / "admin-12-lottery-live.png", full_page=True)

    # Ended: the close-out's leftover stock shows beside the counters.
    await _confirm(page, "end", name="财神到")
    await expect(page.locator("#live-state")).to_have_attribute("data-state", "ended")
    await expect(page.locator("#kpi-unwon")).to_be_visible()
    closed = (await _stats(service.base, cid))["closeout"]
    await expect(page.locator("#kpi-unwon")).to_have_text(str(sum(t["unwon"] for t in closed)))
    assert sum(t["unwon"] + t["unreleased"] for t in closed) == 53 - 10
    await page.screenshot(path=ARTIFACTS / "admin-13-lottery-ended.png", full_page=True)
    assert watched.problems == []
    await context.close()


async def test_console_creates_a_sharded_red_packet_and_shows_each_sub_pool(
    console_service: Service, browser: Browser
) -> None:
    """shards from the form; the live view draws one bar per sub-pool, its won part as
    the sub-pool's won_count; a refused shards count is shown beside its field."""
    service = console_service
    await _ready(service)
    context = await browser.new_context(viewport={"width": 1100, "height": 900}, locale="zh-CN")
    page = await context.new_page()
    watched = Watched(page)
    await _sign_in(page, service.base)
    await page.locator("#view-list a[href='#/new']").click()
    await page.fill("#f-name", "分片红包")
    await page.fill("#f-total_fen", "3000")
    await page.fill("#f-count", "30")
    await page.fill("#f-shards", "31")
    await page.locator("#create").click()
    await expect(page.locator("[data-field='shards'] .field__error")).to_contain_text("shards")
    await page.fill("#f-shards", "3")
    await page.locator("#create").click()
    await page.wait_for_url("**/admin#/c/*")
    cid = page.url.rsplit("/", 1)[1]
    await expect(page.locator("#chart-shards")).to_be_visible()
    assert await page.locator("#chart-shards .bar__track").count() == 3

    grabbed = await _each_once(service.base, cid, "grab", [f"s{n}" for n in range(7)])
    assert grabbed == ["won"] * 7
    await expect(page.locator("#kpi-won_count")).to_have_text("7 / 30")
    stats = await _stats(service.base, cid)
    assert stats["shards"] == 3
    assert sum(p["won_count"] for p in stats["per_shard"]) == 7
    label = await page.locator("#chart-shards svg").get_attribute("aria-label")
    assert label is not None
    for p in stats["per_shard"]:
        size = p["won_count"] + p["remaining_count"]
        assert f"Shard {p['shard']}  {p['won_count']} / {size}" in label
    assert await page.locator("#chart-shards .bar--won").count() == sum(
        1 for p in stats["per_shard"] if p["won_count"]
    )
    assert watched.problems == []
    await context.close()


async def test_console_shows_payout_states(paying_service: Service, browser: Browser) -> None:
    service = paying_service
    await _ready(service)
    ARTIFACTS.mkdir(exist_ok=True)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{service.base}/api/admin/campaigns",
            json={"kind": "red_packet", "name": "新春红包", "total_fen": 888, "count": 1},
            headers=ADMIN,
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        cid = (await resp.json())["id"]
    player = await _phone(browser)
    await player.goto(f"{service.base}/c/{cid}")
    await _log_in(player, service.base, cid, "e2e-payee")
    await player.locator("#action").click()
    await expect(player.locator("#amount")).to_have_text("8.88")

    context = await browser.new_context(viewport={"width": 1100, "height": 900}, locale="zh-CN")
    page = await context.new_page()
    watched = Watched(page)
    await _sign_in(page, service.base)
    await page.locator(f"#campaigns li[data-id='{cid}'] a").click()
    chart = page.locator("#chart-payouts")
    # The grant reaches PostgreSQL, its bill is made: the chart shows it by state.
    await expect(chart).to_be_visible(timeout=30_000)
    await expect(chart.locator(".bar__track")).to_have_count(1, timeout=30_000)
    payouts = (await _stats(service.base, cid))["payouts"]
    assert payouts["total"] == {"count": 1, "fen": 888}
    (state,) = (k for k in payouts if k != "total")
    await expect(chart).to_contain_text(state)
    await expect(chart).to_contain_text("¥8.88")
    await page.screenshot(path=ARTIFACTS / "admin-14-payouts.png", full_page=True)
    assert watched.problems == []
    await context.close()


async def test_console_viewer_may_look_but_not_act(
    console_service: Service, browser: Browser, database_url: str
) -> None:
    service = console_service
    await _ready(service)
    added = subprocess.run(
        [sys.executable, "-m", "app", "operator", "add", "值班-小王", "--role", "viewer"],
        env={**os.environ, "DATABASE_URL": database_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    viewer = added.stdout.strip().splitlines()[-1]
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{service.base}/api/admin/campaigns",
            json={"kind": "red_packet", "name": "新春红包", "total_fen": 1_000, "count": 10},
            headers=ADMIN,
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        cid = (await resp.json())["id"]
    context = await browser.new_context(viewport={"width": 1100, "height": 900}, locale="zh-CN")
    page = await context.new_page()
    watched = Watched(page)
    await page.goto(f"{service.base}/admin")
    await page.fill("#token", viewer)
    await page.locator("#signin").click()
    await page.locator(f"#campaigns li[data-id='{cid}'] a").click()
    await expect(page.locator("#live-state")).to_have_attribute("data-state", "open")
    # Its pause is refused (403), said on the page; the campaign stays open.
    await _confirm(page, "pause")
    await expect(page.locator("#live-error")).to_contain_text("只读")
    await expect(page.locator("#live-state")).to_have_attribute("data-state", "open")
    assert (await _stats(service.base, cid))["state"] == "open"
    await page.screenshot(path=ARTIFACTS / "admin-15-viewer-refused.png", full_page=True)
    # Creating is refused the same way, above the form's buttons.
    await page.locator("#nav-new").click()
    await page.fill("#f-name", "不该有")
    await page.fill("#f-total_fen", "100")
    await page.fill("#f-count", "1")
    await page.locator("#create").click()
    await expect(page.locator("#form-error")).to_contain_text("只读")
    await expect(page.locator("#view-create")).to_be_visible()
    assert watched.problems == []
    await context.close()
