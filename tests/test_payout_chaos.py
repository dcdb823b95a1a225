"""Payouts on real processes (issue 15, point 7): players win through the real HAProxy and
workers, two payout processes pay them through the fake WeChat Pay while it fails a third
of the calls (5xx, and time-outs after creating the bill), one payout process is SIGKILLed
twice mid-batch, and every notification is sent twice and out of order.

Afterwards: every grant has exactly one SUCCESS bill on the fake's own ledger, nobody was
paid twice or more than won, our state matches the fake's, the shared rate limit held
(the fake measures its busiest second), and `reconcile` says OK.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from app.local.chaos import Load, Stack, create_campaign, mint_players
from app.local.embedded import free_port
from app.local.fakewechatpay import provision
from app.local.haproxy import haproxy_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        haproxy_binary() is None, reason="haproxy not installed (.ci/run installs it)"
    ),
]

PLAYERS = 240
RATE_PER_S = 40
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PayingStack(Stack):
    """The chaos stack, its workers able to verify WeChat Pay's notifications."""

    payout_env: dict[str, str] = field(default_factory=dict)

    def _env(self) -> dict[str, str]:
        return {**super()._env(), **self.payout_env}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[PayingStack]:
    pay_port = free_port()
    env = provision(
        tmp_path / "wechatpay",
        "wxchaospay000001",
        f"http://127.0.0.1:{pay_port}",
        "http://127.0.0.1:9/set-once-haproxy-listens",
    )
    env.update(
        PAYOUT_RATE_PER_S=str(RATE_PER_S),
        PAYOUT_HTTP_TIMEOUT_S="1",
        PAYOUT_LEASE_S="3",
        PAYOUT_POLL_S="1",
        PAYOUT_RETRY_MAX_S="2",
        PAYOUT_BATCH_MAX="20",
    )
    async with PayingStack(tmp_path, drain_in_worker=True, payout_env=env) as running:
        running.payout_env["WECHATPAY_NOTIFY_URL"] = f"{running.url}/api/wechatpay/notify"
        running.payout_env["FAKE_PAY_PORT"] = str(pay_port)
        running._spawn(
            "fakepay",
            [sys.executable, "-m", "app", "fake-wechatpay", "--port", str(pay_port)],
            running._env(),
        )
        yield running


def start_payout(stack: PayingStack, name: str) -> None:
    stack._spawn(name, [sys.executable, "-m", "app", "payout"], stack._env())


async def fake(stack: PayingStack, method: str, path: str, body: Any = None) -> Any:
    url = f"http://127.0.0.1:{stack.payout_env['FAKE_PAY_PORT']}{path}"
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.request(method, url, json=body) as resp:
                    return await resp.json()
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    raise AssertionError("the fake WeChat Pay does not answer")


async def wait_for_bills(stack: PayingStack, count: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while len((await fake(stack, "GET", "/fake/ledger"))["bills"]) < count:
        assert time.monotonic() < deadline, f"fewer than {count} bills at the fake"
        await asyncio.sleep(0.1)


async def test_exactly_once_under_failures_kills_and_duplicate_notifications(
    stack: PayingStack,
) -> None:
    await fake(
        stack,
        "POST",
        "/fake/faults",
        {
            "error_rate": 0.17,
            "timeout_rate": 0.17,
            "hang_s": 2.5,
            "duplicate_notifications": True,
            "out_of_order": True,
            "auto_confirm": True,
            "success_delay_s": 0.1,
        },
    )
    start_payout(stack, "pay1")
    start_payout(stack, "pay2")
    cid = await create_campaign(stack.url, "payout chaos", count=PLAYERS)
    load = Load(stack.url, cid, await mint_players(stack.redis_url, "payee-", PLAYERS))
    grabbing = asyncio.create_task(load.run())

    # SIGKILL one payout process twice, each time with bills in its hands.
    for share in (4, 2):
        await wait_for_bills(stack, PLAYERS // share, within_s=60)
        stack.kill("pay1")
        start_payout(stack, "pay1")
    await grabbing
    won = {u: amounts[0] for u, amounts in load.told_won().items()}
    assert len(won) == PLAYERS  # the campaign is exactly big enough for everyone

    pg = await asyncpg.connect(stack.database_url)
    try:
        deadline = time.monotonic() + 150
        while True:
            states = Counter(
                r["state"]
                for r in await pg.fetch("SELECT state FROM payouts WHERE campaign_id = $1", cid)
            )
            if states == Counter({"SUCCESS": PLAYERS}):
                break
            assert time.monotonic() < deadline, f"not all paid: {states}"
            await asyncio.sleep(0.5)
        ours = {
            r["out_bill_no"]: (r["openid"], r["amount_fen"])
            for r in await pg.fetch(
                "SELECT out_bill_no, openid, amount_fen FROM payouts WHERE campaign_id = $1", cid
            )
        }
    finally:
        await pg.close()

    ledger = await fake(stack, "GET", "/fake/ledger")
    bills = ledger["bills"]
    # Exactly one bill per grant at the fake, each SUCCESS, each the grant's amount.
    assert sorted(b["out_bill_no"] for b in bills) == sorted(ours)
    assert {b["state"] for b in bills} == {"SUCCESS"}
    paid = Counter[str]()
    for b in ledger["paid"]:
        assert ours[b["out_bill_no"]] == (b["openid"], b["transfer_amount"])
        paid[b["openid"]] += b["transfer_amount"]
    assert paid == Counter(won)  # nobody paid twice, nor more than won, nor unpaid
    # The faults really happened: retried creates and notifications sent twice.
    assert ledger["creates"] > PLAYERS
    notes = await fake(stack, "GET", "/fake/notifications")
    assert sum(1 for n in notes if n["state"] == "SUCCESS") >= 2 * PLAYERS
    # The shared limit held across the two (and restarted) payout processes: a call goes
    # within half a slot of its own, so a second holds at most rate + 1 (a window's two
    # edges), plus one for the network between us and the fake.
    assert ledger["busiest_second"] <= RATE_PER_S + 2

    # Through HAProxy to the workers: a replayed notification, and the same one unsigned
    # and re-signed by a stranger, are refused; every bill stays SUCCESS.
    sent = notes[-1]
    stranger = {
        **sent["headers"],
        "Wechatpay-Signature": sent["headers"]["Wechatpay-Signature"][::-1],
    }
    unsigned = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for headers, status in ((sent["headers"], 400), (stranger, 401), (unsigned, 401)):
            async with http.post(
                f"{stack.url}/api/wechatpay/notify", data=sent["body"], headers=headers
            ) as resp:
                assert resp.status == status
                assert (await resp.json())["code"] == "FAIL"
    pg = await asyncpg.connect(stack.database_url)
    try:
        assert (
            await pg.fetchval(
                "SELECT count(*) FROM payouts WHERE campaign_id = $1 AND state = 'SUCCESS'", cid
            )
            == PLAYERS
        )
    finally:
        await pg.close()

    # Reconcile asks the fake about every bill: without its faults now (a query answered
    # 5xx is reported by reconcile as a mismatch, as it should be).
    await fake(stack, "POST", "/fake/faults", {"error_rate": 0.0, "timeout_rate": 0.0})
    reconcile = subprocess.run(
        [sys.executable, "-m", "app", "reconcile", cid],
        env={
            **os.environ,
            **stack.payout_env,
            "REDIS_URL": stack.redis_url,
            "DATABASE_URL": stack.database_url,
        },
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert f"WeChat Pay queried for {PLAYERS} bills" in reconcile.stdout
    assert "pending bills: 0" in reconcile.stdout
