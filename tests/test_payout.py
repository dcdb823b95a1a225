"""Payouts through WeChat Pay (issue 15), in process: the app and the payout worker against
the fake WeChat Pay over real loopback HTTP, real Redis and PostgreSQL.

Every test checks money: bills against grants, and the fake's own ledger of what it paid.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.campaigns import operations
from app.local.embedded import EmbeddedPostgres, free_port
from app.local.fakewechatpay import FakeWeChatPay, create_fake_pay_app, fake_from_env, provision
from app.payout import wechatpay
from app.payout.client import WeChatPayClient
from app.payout.ratelimit import SharedLimit
from app.payout.worker import PayoutWorker
from app.settings import PayoutSettings, Settings, SettingsError
from app.store import ledger, payouts
from app.store.scripts import PAYOUT_PAUSE_KEY
from app.web.factory import create_app
from tests.conftest import ADMIN, PAGE, create_campaign, login

BILL_NO = re.compile(r"[A-Za-z0-9]{5,32}")
TUNING = {
    "PAYOUT_POLL_S": "1",
    "PAYOUT_RETRY_MAX_S": "1",
    "PAYOUT_HTTP_TIMEOUT_S": "1",
    "PAYOUT_LEASE_S": "5",
    "PAYOUT_RATE_PER_S": "200",
}


@dataclass
class Paying:
    """The app, the fake WeChat Pay and a payout worker, all in this process."""

    client: TestClient
    fake: FakeWeChatPay
    fake_base: str
    pool: asyncpg.Pool
    redis: Redis
    settings: PayoutSettings
    worker: PayoutWorker
    http: aiohttp.ClientSession

    async def until(
        self, what: str, check: Callable[[], Awaitable[bool]], within_s: float = 15
    ) -> None:
        """Run the worker until ``check`` holds (bounded)."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.worker.run(stop))
        try:
            deadline = time.monotonic() + within_s
            while not await check():
                assert time.monotonic() < deadline, f"not within {within_s}s: {what}"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task

    async def states(self, campaign_id: str) -> dict[str, str]:
        return {b.openid: b.state for b in await payouts.campaign_bills(self.pool, campaign_id)}

    async def faults(self, **changes: object) -> None:
        async with self.http.post(f"{self.fake_base}/fake/faults", json=changes) as resp:
            assert resp.status == 200

    async def fake_ledger(self) -> dict[str, Any]:
        async with self.http.get(f"{self.fake_base}/fake/ledger") as resp:
            return dict(await resp.json())


def payout_env(tmp_path: Path, fake_port: int, app_port: int) -> dict[str, str]:
    """Keys and settings of both sides, generated for this test."""
    env = provision(
        tmp_path / "keys",
        "wxpaytest0000001",
        f"http://127.0.0.1:{fake_port}",
        f"http://127.0.0.1:{app_port}/api/wechatpay/notify",
    )
    return {**env, **TUNING}


@pytest.fixture
async def paying(
    aiohttp_server: Any, aiohttp_client: Any, settings: Settings, tmp_path: Path, database_url: str
) -> AsyncIterator[Paying]:
    fake_port, app_port = free_port(), free_port()
    env = payout_env(tmp_path, fake_port, app_port)
    payout_settings = PayoutSettings.from_env(env)
    fake = fake_from_env(env)
    fake.faults.success_delay_s = 0.05
    await aiohttp_server(create_fake_pay_app(fake), port=fake_port)
    app = create_app(settings.with_(payout=payout_settings), access_log=None)
    server = await aiohttp_server(app, port=app_port)
    client = await aiohttp_client(server, headers=PAGE)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    redis = Redis.from_url(settings.redis_url)
    limit = SharedLimit(redis, payout_settings.rate_per_s)
    async with aiohttp.ClientSession() as http:
        worker = PayoutWorker(
            pool, WeChatPayClient(http, payout_settings, limit), limit, payout_settings
        )
        yield Paying(
            client,
            fake,
            f"http://127.0.0.1:{fake_port}",
            pool,
            redis,
            payout_settings,
            worker,
            http,
        )
    await pool.close()
    await redis.aclose()


async def win(paying: Paying, players: list[str], **fields: object) -> str:
    """A red packet, grabbed by every one of ``players``; returns once the ledger (and so
    the outbox) holds every grant."""
    client = paying.client
    campaign = await create_campaign(client, **fields)
    cid = str(campaign["id"])
    for openid in players:
        await login(client, openid)
        resp = await client.post(f"/api/campaigns/{cid}/grab")
        assert (await resp.json())["result"] == "won"
    deadline = time.monotonic() + 10
    while len(await payouts.campaign_bills(paying.pool, cid)) < len(players):
        assert time.monotonic() < deadline, "grants not drained into the outbox"
        await asyncio.sleep(0.05)
    return cid


async def me(client: TestClient, cid: str, openid: str) -> dict[str, Any]:
    await login(client, openid)
    resp = await client.get(f"/api/campaigns/{cid}/me")
    assert resp.status == 200
    return dict(await resp.json())


async def assert_paid_exactly_once(paying: Paying, cid: str) -> None:
    """Every grant has one SUCCESS bill on the fake's ledger, of its amount, and nothing else."""
    grabs = await ledger.fetch_grabs(paying.pool, cid)
    bills = {b.out_bill_no: b for b in await payouts.campaign_bills(paying.pool, cid)}
    fake = await paying.fake_ledger()
    paid = [p for p in fake["paid"] if p["out_bill_no"] in bills]
    assert sorted((p["openid"], p["transfer_amount"]) for p in paid) == sorted(
        (u, e.amount_fen) for u, e in grabs.items()
    )
    assert {b.state for b in bills.values()} == {"SUCCESS"}


async def test_every_grant_gets_one_bill_whoever_records_it(paying: Paying) -> None:
    cid = await win(paying, ["alice", "bob", "carol"])
    bills = await payouts.campaign_bills(paying.pool, cid)
    grabs = await ledger.fetch_grabs(paying.pool, cid)
    assert sorted((b.openid, b.grant_no, b.amount_fen) for b in bills) == sorted(
        (u, e.seq, e.amount_fen) for u, e in grabs.items()
    )
    assert all(BILL_NO.fullmatch(b.out_bill_no) for b in bills)
    assert len({b.out_bill_no for b in bills}) == 3
    assert {b.state for b in bills} == {"NEW"}
    # The bill number depends on the grant alone: recomputed, it is the same.
    for b in bills:
        again = await paying.pool.fetchval(
            "SELECT payout_bill_no($1, 'grab', $2, $3)", cid, b.openid, b.grant_no
        )
        assert again == b.out_bill_no
    # A grant written without its bill is impossible: both are one statement.
    with pytest.raises(asyncpg.CheckViolationError):
        await paying.pool.execute(
            "INSERT INTO payouts (out_bill_no, base_bill_no, campaign_id, openid, grant_kind,"
            " grant_no, amount_fen) VALUES ('x', 'x', $1, 'z', 'grab', 99, 1)",
            cid,
        )
    # Lottery draws: a prize with value_fen gets a bill, a 0-value prize or no prize none.
    await paying.pool.execute(
        "INSERT INTO campaigns (id, kind, name) VALUES ('lot1', 'lottery', 'L')"
    )
    await paying.pool.execute(
        "INSERT INTO draws (campaign_id, openid, draw_no, tier, value_fen, day, drawn_at,"
        " stream_id) VALUES ('lot1', 'dan', 1, 0, 888, '2026-01-01', now(), '1-1'),"
        " ('lot1', 'dan', 2, NULL, 0, '2026-01-01', now(), '1-2'),"
        " ('lot1', 'dan', 3, 1, 0, '2026-01-01', now(), '1-3')"
    )
    lottery = await payouts.campaign_bills(paying.pool, "lot1")
    assert [(b.grant_kind, b.grant_no, b.amount_fen) for b in lottery] == [("draw", 1, 888)]


async def test_win_claim_confirm_then_paid(paying: Paying) -> None:
    cid = await win(paying, ["alice"])
    client = paying.client
    view = await me(client, cid, "alice")
    assert view["payout"]["state"] == "to_claim"
    assert view["payout"]["label"] == "待领取"
    # Before the bill exists at WeChat Pay, a claim says to wait, with the queue position.
    resp = await client.post(f"/api/campaigns/{cid}/claim")
    assert resp.status == 409
    assert (await resp.json())["error"] == "payout_not_ready"

    async def waiting() -> bool:
        return (await paying.states(cid)) == {"alice": "WAIT_USER_CONFIRM"}

    await paying.until("bill created", waiting)
    resp = await client.post(f"/api/campaigns/{cid}/claim")
    assert resp.status == 200
    claim = await resp.json()
    assert claim["result"] == "confirm"
    assert claim["mch_id"] == paying.settings.mchid
    assert claim["appid"] == paying.settings.appid
    assert claim["package_info"] == paying.fake.bills[claim["out_bill_no"]].package_info
    view = await me(client, cid, "alice")
    assert view["payout"]["bills"][0]["claimable"] is True
    assert view["payout"]["label"] == "待领取"  # never 已到账 before SUCCESS
    # The claim is CSRF-checked like a grab.
    resp = await client.post(f"/api/campaigns/{cid}/claim", headers={"X-Requested-With": "x"})
    assert resp.status == 403
    # A player with nothing won has nothing to claim.
    await login(client, "nobody")
    resp = await client.post(f"/api/campaigns/{cid}/claim")
    assert resp.status == 404
    assert (await resp.json())["error"] == "no_payout"

    async with paying.http.post(
        f"{paying.fake_base}/fake/confirm-bill", json={"out_bill_no": claim["out_bill_no"]}
    ) as confirmed:
        assert (await confirmed.json())["confirmed"] is True

    async def paid() -> bool:
        return (await paying.states(cid)) == {"alice": "SUCCESS"}

    # The notification alone settles it: no worker runs here.
    deadline = time.monotonic() + 10
    while not await paid():
        assert time.monotonic() < deadline, "no SUCCESS notification applied"
        await asyncio.sleep(0.05)
    view = await me(client, cid, "alice")
    assert view["payout"]["state"] == "paid"
    assert view["payout"]["label"] == "已到账"
    assert view["payout"]["paid_fen"] == view["amount_fen"]
    await assert_paid_exactly_once(paying, cid)


async def test_unclear_answers_are_resolved_by_query_never_by_a_new_bill(paying: Paying) -> None:
    cid = await win(paying, ["alice", "bob"])
    # Every create makes the bill, then answers too late; then every call is a 500.
    await paying.faults(timeout_rate=1.0, hang_s=2.0)

    async def created() -> bool:
        return len(paying.fake.bills) == 2

    await paying.until("bills created at the fake", created)
    assert set((await paying.states(cid)).values()) == {"NEW"}
    assert all(b.sent for b in await payouts.campaign_bills(paying.pool, cid))
    await paying.faults(timeout_rate=0.0, error_rate=1.0)
    await paying.until("a few 500s", lambda: _later(1.5))
    assert set((await paying.states(cid)).values()) == {"NEW"}
    await paying.faults(error_rate=0.0)

    async def adopted() -> bool:
        return set((await paying.states(cid)).values()) == {"WAIT_USER_CONFIRM"}

    await paying.until("the bills found by query", adopted)
    for fake_bill in list(paying.fake.bills.values()):
        assert paying.fake.confirm(fake_bill)

    async def settled() -> bool:
        return set((await paying.states(cid)).values()) == {"SUCCESS"}

    await paying.until("bills followed to SUCCESS", settled)
    ledger_ = await paying.fake_ledger()
    assert len(ledger_["bills"]) == 2  # two grants, two bills, however many requests
    assert ledger_["creates"] >= 2
    await assert_paid_exactly_once(paying, cid)


async def _later(seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return True


async def test_rate_limited_and_no_balance_pause_everyone_then_pay(paying: Paying) -> None:
    cid = await win(paying, ["alice"], total_fen=500, count=1)
    await paying.faults(balance_fen=100, auto_confirm=True)

    async def paused() -> bool:
        return int(await paying.redis.pttl(PAYOUT_PAUSE_KEY)) > 0

    await paying.until("a pause after NOT_ENOUGH", paused)
    assert (await paying.states(cid)) == {"alice": "NEW"}
    assert not paying.fake.bills
    await paying.faults(balance_fen=10_000, rate_limit=1)
    # One create per second at most: a second bill now is FREQUENCY_LIMITED, then paid.
    cid2 = await win(paying, ["bob"], total_fen=300, count=1)

    async def settled() -> bool:
        states = {**(await paying.states(cid)), **(await paying.states(cid2))}
        return set(states.values()) == {"SUCCESS"}

    await paying.until("both paid after the pauses", settled, within_s=20)
    await assert_paid_exactly_once(paying, cid)
    await assert_paid_exactly_once(paying, cid2)
    assert paying.fake.faults.balance_fen == 10_000 - 500 - 300


async def test_parameter_error_fails_the_bill_and_retry_pays_it(paying: Paying) -> None:
    cid = await win(paying, ["alice"])
    right = paying.fake.appid
    paying.fake.appid = "wxsomeoneelse"  # our appid is refused: PARAM_ERROR

    async def failed() -> bool:
        return (await paying.states(cid)) == {"alice": "FAIL"}

    await paying.until("FAIL", failed)
    view = await me(paying.client, cid, "alice")
    assert view["payout"]["state"] == "failed"
    assert view["payout"]["label"] == "未到账"
    assert "PARAM_ERROR" in view["payout"]["bills"][0]["reason"]
    report = await operations.reconcile(paying.redis, paying.pool, cid, paying.worker._client)
    assert report.ok, report.render()
    assert "failed bills: 1" in report.render()

    paying.fake.appid = right
    paying.fake.faults.auto_confirm = True
    (old,) = await payouts.campaign_bills(paying.pool, cid)
    (renumbered,) = await payouts.retry_failed(paying.pool, cid)
    assert renumbered == old.base_bill_no + "R1"

    async def settled() -> bool:
        return (await paying.states(cid)) == {"alice": "SUCCESS"}

    await paying.until("the retried bill paid", settled)
    await assert_paid_exactly_once(paying, cid)
    (bill,) = await payouts.campaign_bills(paying.pool, cid)
    assert bill.previous_bills == (old.out_bill_no,)
    report = await operations.reconcile(paying.redis, paying.pool, cid, paying.worker._client)
    assert report.ok, report.render()


async def test_unconfirmed_bill_is_cancelled_after_the_timeout(paying: Paying) -> None:
    paying.worker._settings = replace(paying.settings, confirm_timeout_s=1)
    cid = await win(paying, ["alice"])

    async def cancelled() -> bool:
        return (await paying.states(cid)) == {"alice": "CANCELLED"}

    await paying.until("CANCELLED", cancelled, within_s=20)
    view = await me(paying.client, cid, "alice")
    assert view["payout"]["label"] == "未到账"
    assert view["payout"]["bills"][0]["reason"] == "超时未确认收款，已撤销"
    assert not (await paying.fake_ledger())["paid"]
    report = await operations.reconcile(paying.redis, paying.pool, cid, paying.worker._client)
    assert report.ok, report.render()
    assert "cancelled bills: 1" in report.render()


async def notify(paying: Paying, headers: dict[str, str], body: str) -> int:
    resp = await paying.client.post(
        "/api/wechatpay/notify", data=body, headers={**headers, "X-Requested-With": ""}
    )
    if resp.status != 204:
        assert (await resp.json())["code"] == "FAIL"
    return resp.status


async def test_forged_unsigned_and_replayed_notifications_change_nothing(
    paying: Paying,
) -> None:
    cid = await win(paying, ["alice"])
    await paying.faults(auto_confirm=True)

    async def settled() -> bool:
        return (await paying.states(cid)) == {"alice": "SUCCESS"}

    await paying.until("SUCCESS", settled)
    (bill,) = await payouts.campaign_bills(paying.pool, cid)
    fake_bill = paying.fake.bills[bill.out_bill_no]
    sent = paying.fake.notifications[-1]
    body = sent["body"]
    # Replayed: the very message WeChat Pay sent, again.
    assert await notify(paying, sent["headers"], body) == 400
    # Unsigned.
    assert await notify(paying, {"Content-Type": "application/json"}, body) == 401
    # Forged: a FAIL for the same bill, signed with a key that is not WeChat Pay's.
    forger = wechatpay.generate_key()
    fake_bill.state = "FAIL"
    paying.fake.notifications.clear()
    forged_fake = FakeWeChatPay(
        paying.fake.mchid,
        paying.fake.appid,
        "x",
        forger.public_key(),
        paying.settings.platform_key_id,
        forger,
        paying.settings.apiv3_key,
    )
    forged_headers = forged_fake.signed(body)
    assert await notify(paying, forged_headers, body) == 401
    # Stale: signed by WeChat Pay's key ten minutes ago.
    stale = paying.fake.signed(body)
    ts = str(int(time.time()) - 600)
    stale["Wechatpay-Timestamp"] = ts
    assert await notify(paying, stale, body) == 401
    # Tampered ciphertext under a valid signature.
    envelope = orjson.loads(body)
    raw = bytearray(base64.b64decode(envelope["resource"]["ciphertext"]))
    raw[0] ^= 1
    envelope["resource"]["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    tampered = orjson.dumps(envelope).decode()
    assert await notify(paying, paying.fake.signed(tampered), tampered) == 400
    # A genuine but older state (out of order) answers 204 and changes nothing either.
    fake_bill.state = "SUCCESS"
    await paying.fake._notify(_as(fake_bill, "WAIT_USER_CONFIRM"), "WAIT_USER_CONFIRM")
    assert paying.fake.notifications[-1]["status"] == 204
    assert (await paying.states(cid)) == {"alice": "SUCCESS"}
    await assert_paid_exactly_once(paying, cid)


def _as(bill: Any, state: str) -> Any:
    return replace(bill, state=state)


async def test_duplicate_and_out_of_order_notifications_are_idempotent(paying: Paying) -> None:
    cid = await win(paying, ["alice", "bob", "carol"])
    await paying.faults(auto_confirm=True, duplicate_notifications=True, out_of_order=True)

    async def settled() -> bool:
        notified = [n for n in paying.fake.notifications if n["state"] == "SUCCESS"]
        return len(notified) == 6 and set((await paying.states(cid)).values()) == {"SUCCESS"}

    await paying.until("duplicated notifications delivered", settled)
    await asyncio.sleep(0.3)  # the out-of-order ones, after the SUCCESS pairs
    assert all(n["status"] == 204 for n in paying.fake.notifications)
    assert set((await paying.states(cid)).values()) == {"SUCCESS"}
    await assert_paid_exactly_once(paying, cid)


async def test_admin_stats_and_reconcile_catch_a_wrong_bill(paying: Paying) -> None:
    cid = await win(paying, ["alice", "bob"], total_fen=1000, count=2)
    await paying.faults(auto_confirm=True)

    async def settled() -> bool:
        return set((await paying.states(cid)).values()) == {"SUCCESS"}

    await paying.until("SUCCESS", settled)
    resp = await paying.client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)
    stats = await resp.json()
    assert stats["payouts"] == {
        "SUCCESS": {"count": 2, "fen": 1000},
        "total": {"count": 2, "fen": 1000},
    }
    client = paying.worker._client
    report = await operations.reconcile(paying.redis, paying.pool, cid, client)
    assert report.ok, report.render()
    # Ours says FAIL where WeChat Pay paid; and one bill pays more than its grant.
    (first, second) = await payouts.campaign_bills(paying.pool, cid)
    await paying.pool.execute(
        "UPDATE payouts SET state = 'FAIL' WHERE out_bill_no = $1", first.out_bill_no
    )
    await paying.pool.execute(
        "UPDATE payouts SET amount_fen = amount_fen + 1 WHERE out_bill_no = $1",
        second.out_bill_no,
    )
    report = await operations.reconcile(paying.redis, paying.pool, cid, client)
    assert not report.ok
    text = "\n".join(report.mismatches)
    assert f"bill {first.out_bill_no}: FAIL here, SUCCESS at WeChat Pay" in text
    assert f"bill {second.out_bill_no}: {second.amount_fen + 1} fen for a grant" in text
    assert f"player {second.openid}: paid {second.amount_fen + 1} fen" in text


async def test_the_rate_limit_is_shared_by_every_process(redis: Redis) -> None:
    limits = [SharedLimit(redis, 20) for _ in range(3)]
    start = time.monotonic()
    times: list[float] = []

    async def calls(limit: SharedLimit) -> None:
        for _ in range(10):
            await limit.acquire("create")
            times.append(time.monotonic())

    await asyncio.gather(*(calls(limit) for limit in limits))
    # 30 calls at 20/s, shared: at least 29 spacings of 50 ms.
    assert times[-1] - start >= 29 * 0.05 * 0.95
    busiest = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert busiest <= 21


def test_signatures_and_the_cipher() -> None:
    key = wechatpay.generate_key()
    public = wechatpay.load_public(wechatpay.public_pem(key))
    message = wechatpay.answer_message("1700000000", "N", '{"a":1}')
    signature = wechatpay.sign(key, message)
    assert wechatpay.verify(public, message, signature)
    assert not wechatpay.verify(public, message + "x", signature)
    assert not wechatpay.verify(public, message, "not base64!")
    signer = wechatpay.MerchantSigner("1900000001", "SERIAL", key)
    header = signer.authorization("POST", "/v3/x", "{}")
    auth = wechatpay.Authorization.parse(header)
    assert auth.mchid == "1900000001"
    assert auth.serial_no == "SERIAL"
    signed = wechatpay.request_message("POST", "/v3/x", auth.timestamp, auth.nonce_str, "{}")
    assert wechatpay.verify(public, signed, auth.signature)
    assert "PRIVATE" not in repr(signer)
    assert "BEGIN" not in repr(signer)
    cipher = wechatpay.ApiV3Cipher(b"k" * 32)
    sealed = cipher.encrypt(b"hello", "abcdefghijkl", "mch_payment")
    assert cipher.decrypt(sealed, "abcdefghijkl", "mch_payment") == b"hello"
    with pytest.raises(wechatpay.SignatureError):
        cipher.decrypt(sealed, "abcdefghijkl", "other")


def test_payout_settings_fail_loudly_and_never_show_keys(tmp_path: Path) -> None:
    env = payout_env(tmp_path, 1, 2)
    settings = PayoutSettings.from_env(env)
    assert settings.enabled
    assert settings.rate_per_s == 200
    shown = repr(settings)
    assert env["WECHATPAY_APIV3_KEY"] not in shown
    assert "PRIVATE KEY" not in shown
    assert PayoutSettings.from_env({}).enabled is False
    assert PayoutSettings().rate_per_s < 100  # below WeChat's 100 creates per second
    with pytest.raises(SettingsError, match="WECHATPAY_PRIVATE_KEY_FILE"):
        PayoutSettings.from_env({**env, "WECHATPAY_PRIVATE_KEY_FILE": ""})
    with pytest.raises(SettingsError, match="cannot read"):
        PayoutSettings.from_env({**env, "WECHATPAY_PRIVATE_KEY_FILE": str(tmp_path / "no")})
    with pytest.raises(SettingsError, match="32"):
        PayoutSettings.from_env({**env, "WECHATPAY_APIV3_KEY": "short"})


async def test_a_lottery_cash_prize_is_paid_and_a_prize_without_value_is_not(
    paying: Paying,
) -> None:
    client = paying.client
    body = {
        "kind": "lottery",
        "name": "财神到",
        "tiers": [
            {"name": "8.88元红包", "stock": 1, "weight": 1, "value_fen": 888},
            {"name": "福袋", "stock": 1, "weight": 1_000_000, "value_fen": None},
        ],
        "no_prize_weight": 0,
        "quota_total": 2,
        "quota_daily": 2,
    }
    resp = await client.post("/api/admin/campaigns", json=body, headers=ADMIN)
    assert resp.status == 201, await resp.json()
    cid = str((await resp.json())["id"])
    await login(client, "dan")
    prizes = []
    for _ in range(2):
        resp = await client.post(f"/api/campaigns/{cid}/draw")
        prizes.append((await resp.json())["prize"]["name"])
    assert sorted(prizes) == ["8.88元红包", "福袋"]  # both stocks of one: one each
    deadline = time.monotonic() + 10
    while not await payouts.campaign_bills(paying.pool, cid):
        assert time.monotonic() < deadline, "draws not drained into the outbox"
        await asyncio.sleep(0.05)
    await paying.faults(auto_confirm=True)

    async def settled() -> bool:
        return (await paying.states(cid)) == {"dan": "SUCCESS"}

    await paying.until("the cash prize paid", settled)
    view = await me(client, cid, "dan")
    assert view["payout"]["state"] == "paid"
    assert [b["amount_fen"] for b in view["payout"]["bills"]] == [888]
    fake = await paying.fake_ledger()
    assert [(p["openid"], p["transfer_amount"]) for p in fake["paid"]] == [("dan", 888)]
    report = await operations.reconcile(paying.redis, paying.pool, cid, paying.worker._client)
    assert report.ok, report.render()


@pytest.mark.slow
async def test_views_answer_without_postgresql(
    aiohttp_server: Any, aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    """The payout part of /me and of the admin stats lives in PostgreSQL, the win in
    Redis: with PostgreSQL stopped both still answer at once, from Redis, and the payout
    part is back when PostgreSQL is."""
    pg = EmbeddedPostgres(tmp_path / "pg", free_port()).start()
    try:
        env = payout_env(tmp_path, free_port(), free_port())
        app = create_app(
            settings.with_(database_url=pg.url, payout=PayoutSettings.from_env(env)),
            access_log=None,
        )
        client = await aiohttp_client(await aiohttp_server(app), headers=PAGE)
        cid = str((await create_campaign(client, total_fen=300, count=3))["id"])
        await login(client, "alice")
        won = await (await client.post(f"/api/campaigns/{cid}/grab")).json()
        assert won["result"] == "won"
        deadline = time.monotonic() + 10
        while (await me(client, cid, "alice"))["payout"] is None:
            assert time.monotonic() < deadline, "the grant never reached the outbox"
            await asyncio.sleep(0.05)

        pg.stop()
        started = time.monotonic()
        view = await me(client, cid, "alice")
        assert view == {"result": "won", "amount_fen": won["amount_fen"], "payout": None}
        resp = await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)
        assert resp.status == 200
        stats = await resp.json()
        assert (stats["won_count"], stats["won_fen"]) == (1, won["amount_fen"])
        assert "payouts" not in stats
        assert time.monotonic() - started < 5

        pg.start()
        deadline = time.monotonic() + 30
        while (await me(client, cid, "alice"))["payout"] is None:
            assert time.monotonic() < deadline, "the payout part did not come back"
            await asyncio.sleep(0.2)
    finally:
        pg.stop()


async def _backlog(client: TestClient) -> float:
    text = await (await client.get("/metrics")).text()
    found = re.search(r"^hongbao_payout_backlog (\S+)$", text, re.MULTILINE)
    assert found, "hongbao_payout_backlog not exported"
    return float(found.group(1))


async def test_the_payout_backlog_is_exported(paying: Paying) -> None:
    """``hongbao_payout_backlog`` (the HongbaoPayoutBacklog alert's metric) counts the bills
    not yet created at WeChat Pay, and falls to 0 once the worker has created them."""
    cid = await win(paying, ["ann", "ben", "cat"])
    deadline = time.monotonic() + 10
    while await _backlog(paying.client) != 3:
        assert time.monotonic() < deadline, "the backlog never showed the three bills"
        await asyncio.sleep(0.2)

    async def created() -> bool:
        return "NEW" not in set((await paying.states(cid)).values())

    await paying.until("bills created", created)
    deadline = time.monotonic() + 10
    while await _backlog(paying.client) != 0:
        assert time.monotonic() < deadline, "the backlog did not fall to 0"
        await asyncio.sleep(0.2)
