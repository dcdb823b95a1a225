"""A fake WeChat Pay for local runs and tests, speaking API v3's merchant-transfer wire format.

- ``POST /v3/fund-app/mch-transfer/transfer-bills`` creates a bill (state
  ``WAIT_USER_CONFIRM``, with a ``package_info``); the same ``out_bill_no`` again answers
  the same bill, and a changed amount, openid or appid under it is ``400 INVALID_REQUEST``.
- ``GET .../transfer-bills/out-bill-no/{out_bill_no}`` answers the bill or ``404 NOT_FOUND``;
  ``POST .../out-bill-no/{out_bill_no}/cancel`` cancels one the player has not confirmed
  (``CANCELING``, then ``CANCELLED``).
- Requests must carry a valid ``WECHATPAY2-SHA256-RSA2048`` Authorization by the merchant
  key (else ``401 SIGN_ERROR``); every answer is signed with the platform key
  (``Wechatpay-Timestamp/-Nonce/-Signature/-Serial``).
- Each state change is notified to the bill's ``notify_url``: signed, its ``resource``
  encrypted with AEAD_AES_256_GCM under the API v3 key, retried until answered 2xx.
- ``GET /fake/confirm?package=P&return=URL``: the player's confirm page (「确认收款」), the
  local stand-in for ``wx.requestMerchantTransfer``; then TRANSFERING, then SUCCESS.
- For tests: ``POST /fake/faults`` (JSON: ``error_rate``, ``timeout_rate``, ``hang_s``,
  ``rate_limit``, ``balance_fen``, ``duplicate_notifications``, ``out_of_order``,
  ``auto_confirm``, ``success_delay_s``), ``POST /fake/confirm-bill`` ``{"out_bill_no"}``,
  ``GET /fake/ledger`` (every bill, what was paid, the busiest second of creates) and
  ``GET /fake/notifications`` (what was sent, to replay).

Bills live in this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import random
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from app.local.embedded import _wait_port, free_port
from app.payout.wechatpay import (
    ApiV3Cipher,
    Authorization,
    SignatureError,
    answer_message,
    fresh,
    generate_key,
    load_private,
    load_public,
    nonce,
    private_pem,
    public_pem,
    request_message,
    sign,
    verify,
)

BILLS = "/v3/fund-app/mch-transfer/transfer-bills"
_BILL_NO = re.compile(r"[A-Za-z0-9]{5,32}")
NOTIFY_ATTEMPTS = 8


@dataclass
class Faults:
    """Fault switches, changed by tests through POST /fake/faults."""

    error_rate: float = 0.0  # share of calls answered 500 SYSTEM_ERROR, nothing done
    timeout_rate: float = 0.0  # share of creates that create the bill, then hang
    hang_s: float = 5.0
    rate_limit: int = 0  # creates per second allowed (0: no limit); above: 429
    balance_fen: int | None = None  # None: unlimited; else NOT_ENOUGH past it
    duplicate_notifications: bool = False
    out_of_order: bool = False  # after the final notification, an older state's again
    auto_confirm: bool = False  # every player confirms at once (load tests)
    success_delay_s: float = 0.2  # TRANSFERING -> SUCCESS


@dataclass
class FakeBill:
    """One transfer bill as the fake holds it."""

    out_bill_no: str
    transfer_bill_no: str
    appid: str
    openid: str
    transfer_amount: int
    transfer_remark: str
    notify_url: str
    state: str
    package_info: str
    create_time: str
    update_time: str
    fail_reason: str | None = None
    history: list[str] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


class FakeWeChatPay:
    """The fake's state: one merchant, its keys, its bills and what it was asked."""

    def __init__(
        self,
        mchid: str,
        appid: str,
        merchant_serial: str,
        merchant_public: rsa.RSAPublicKey,
        platform_key_id: str,
        platform_private: rsa.RSAPrivateKey,
        apiv3_key: bytes,
    ) -> None:
        self.mchid = mchid
        self.appid = appid
        self._merchant_serial = merchant_serial
        self._merchant_public = merchant_public
        self._platform_key_id = platform_key_id
        self._platform_private = platform_private
        self._cipher = ApiV3Cipher(apiv3_key)
        self.faults = Faults()
        self.bills: dict[str, FakeBill] = {}
        self.create_times: list[float] = []
        self.calls = 0
        self.notifications: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"FakeWeChatPay(mchid={self.mchid!r})"

    # --- the wire -------------------------------------------------------------------

    def answer(self, status: int, body: dict[str, Any] | None) -> web.Response:
        """A response signed with the platform key."""
        text = "" if body is None else orjson.dumps(body).decode()
        return web.Response(
            status=status, text=text, content_type="application/json", headers=self.signed(text)
        )

    def signed(self, text: str) -> dict[str, str]:
        """The Wechatpay-* headers signing ``text``."""
        timestamp, nonce_str = str(int(time.time())), nonce()
        return {
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce_str,
            "Wechatpay-Signature": sign(
                self._platform_private, answer_message(timestamp, nonce_str, text)
            ),
            "Wechatpay-Serial": self._platform_key_id,
        }

    def authenticate(self, request: web.Request, body: str) -> None:
        """Raise SignatureError unless the merchant signed this request."""
        auth = Authorization.parse(request.headers.get("Authorization", ""))
        if auth.mchid != self.mchid or auth.serial_no != self._merchant_serial:
            raise SignatureError("unknown merchant or certificate")
        if not fresh(auth.timestamp):
            raise SignatureError("timestamp expired")
        message = request_message(
            request.method, request.path_qs, auth.timestamp, auth.nonce_str, body
        )
        if not verify(self._merchant_public, message, auth.signature):
            raise SignatureError("signature does not verify")

    def error(self, status: int, code: str, message: str) -> web.Response:
        """A signed error answer in WeChat Pay's shape."""
        return self.answer(status, {"code": code, "message": message})

    # --- bills ----------------------------------------------------------------------

    def view(self, bill: FakeBill) -> dict[str, Any]:
        """A bill as the query endpoint answers it."""
        out: dict[str, Any] = {
            "mch_id": self.mchid,
            "out_bill_no": bill.out_bill_no,
            "transfer_bill_no": bill.transfer_bill_no,
            "appid": bill.appid,
            "state": bill.state,
            "transfer_amount": bill.transfer_amount,
            "transfer_remark": bill.transfer_remark,
            "openid": bill.openid,
            "create_time": bill.create_time,
            "update_time": bill.update_time,
        }
        if bill.state == "WAIT_USER_CONFIRM":
            out["package_info"] = bill.package_info
        if bill.fail_reason:
            out["fail_reason"] = bill.fail_reason
        return out

    def busiest_second(self) -> int:
        """The most create requests received within any one second."""
        times, best, start = sorted(self.create_times), 0, 0
        for end, at in enumerate(times):
            while at - times[start] >= 1.0:
                start += 1
            best = max(best, end - start + 1)
        return best

    def move(self, bill: FakeBill, state: str, reason: str | None = None) -> None:
        """Change a bill's state and notify it."""
        bill.history.append(bill.state)
        bill.state, bill.update_time = state, _now()
        if reason:
            bill.fail_reason = reason
        self.spawn(self._notify_all(bill, state))

    def confirm(self, bill: FakeBill) -> bool:
        """The player confirmed receipt: TRANSFERING now, SUCCESS shortly."""
        if bill.state != "WAIT_USER_CONFIRM":
            return False
        self.move(bill, "TRANSFERING")
        self.spawn(self._succeed(bill))
        return True

    async def _succeed(self, bill: FakeBill) -> None:
        await asyncio.sleep(self.faults.success_delay_s)
        if bill.state == "TRANSFERING":
            self.move(bill, "SUCCESS")

    async def _finish_cancel(self, bill: FakeBill) -> None:
        await asyncio.sleep(0.05)
        if bill.state == "CANCELING":
            self.move(bill, "CANCELLED")

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, kept until done."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _notify_all(self, bill: FakeBill, state: str) -> None:
        copies = 2 if self.faults.duplicate_notifications else 1
        for _ in range(copies):
            await self._notify(bill, state)
        if self.faults.out_of_order and state in ("SUCCESS", "FAIL", "CANCELLED") and bill.history:
            await self._notify(bill, bill.history[-1])

    async def _notify(self, bill: FakeBill, state: str) -> None:
        resource = {
            "out_bill_no": bill.out_bill_no,
            "transfer_bill_no": bill.transfer_bill_no,
            "state": state,
            "mch_id": self.mchid,
            "transfer_amount": bill.transfer_amount,
            "openid": bill.openid,
            "create_time": bill.create_time,
            "update_time": bill.update_time,
        }
        if bill.fail_reason and state in ("FAIL", "CANCELLED"):
            resource["fail_reason"] = bill.fail_reason
        nonce_str = secrets.token_hex(6)
        body = orjson.dumps(
            {
                "id": secrets.token_hex(16),
                "create_time": _now(),
                "resource_type": "encrypt-resource",
                "event_type": "MCHTRANSFER.BILL.FINISHED",
                "summary": "商家转账单据终态通知",
                "resource": {
                    "original_type": "mch_payment",
                    "algorithm": "AEAD_AES_256_GCM",
                    "ciphertext": self._cipher.encrypt(
                        orjson.dumps(resource), nonce_str, "mch_payment"
                    ),
                    "associated_data": "mch_payment",
                    "nonce": nonce_str,
                },
            }
        ).decode()
        headers = {**self.signed(body), "Content-Type": "application/json"}
        record: dict[str, Any] = {"state": state, "headers": headers, "body": body, "status": None}
        self.notifications.append(record)
        assert self.http is not None
        for attempt in range(NOTIFY_ATTEMPTS):
            try:
                async with self.http.post(bill.notify_url, data=body, headers=headers) as resp:
                    record["status"] = resp.status
                    if resp.status < 300:
                        return
            except (aiohttp.ClientError, TimeoutError):
                record["status"] = "unreachable"
            await asyncio.sleep(min(0.2 * 2**attempt, 5))


FAKE_PAY = web.AppKey("fake_wechatpay", FakeWeChatPay)


async def _body(request: web.Request) -> tuple[FakeWeChatPay, str, web.Response | None]:
    fake = request.app[FAKE_PAY]
    fake.calls += 1
    text = await request.text()
    try:
        fake.authenticate(request, text)
    except SignatureError as exc:
        return fake, text, fake.error(401, "SIGN_ERROR", f"签名错误: {exc}")
    if random.random() < fake.faults.error_rate:
        return fake, text, fake.error(500, "SYSTEM_ERROR", "系统错误，请使用原单号重试")
    return fake, text, None


async def create_bill(request: web.Request) -> web.Response:
    """POST /v3/fund-app/mch-transfer/transfer-bills."""
    fake = request.app[FAKE_PAY]
    fake.create_times.append(time.monotonic())
    limit = fake.faults.rate_limit
    if limit:
        now = time.monotonic()
        if sum(1 for t in fake.create_times if now - t < 1.0) > limit:
            fake.calls += 1
            return fake.error(429, "FREQUENCY_LIMITED", "请求频率过高，请稍后重试")
    fake, text, refused = await _body(request)
    if refused is not None:
        return refused
    try:
        body = orjson.loads(text)
        out_bill_no = body["out_bill_no"]
        amount = body["transfer_amount"]
        openid, appid = body["openid"], body["appid"]
        remark, notify_url = body["transfer_remark"], body.get("notify_url", "")
        body["transfer_scene_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return fake.error(400, "PARAM_ERROR", "参数错误")
    if (
        not isinstance(out_bill_no, str)
        or not _BILL_NO.fullmatch(out_bill_no)
        or not isinstance(amount, int)
        or amount <= 0
        or appid != fake.appid
    ):
        return fake.error(400, "PARAM_ERROR", "参数错误: out_bill_no, transfer_amount 或 appid")
    bill = fake.bills.get(out_bill_no)
    if bill is not None:
        if (bill.transfer_amount, bill.openid, bill.appid) != (amount, openid, appid):
            return fake.error(400, "INVALID_REQUEST", "商户单号重复，且参数与原单不一致")
        return fake.answer(200, _created(fake, bill))
    balance = fake.faults.balance_fen
    if balance is not None:
        if amount > balance:
            return fake.error(403, "NOT_ENOUGH", "商户账户余额不足")
        fake.faults.balance_fen = balance - amount
    created = _now()
    bill = FakeBill(
        out_bill_no,
        f"1330000{secrets.randbelow(10**20):020d}",
        appid,
        openid,
        amount,
        remark,
        notify_url,
        "WAIT_USER_CONFIRM",
        f"ABBQO{secrets.token_urlsafe(24)}",
        created,
        created,
    )
    fake.bills[out_bill_no] = bill
    if fake.faults.auto_confirm:
        fake.confirm(bill)
    if random.random() < fake.faults.timeout_rate:
        # The bill exists; the answer never arrives in time.
        await asyncio.sleep(fake.faults.hang_s)
    return fake.answer(200, _created(fake, bill))


def _created(fake: FakeWeChatPay, bill: FakeBill) -> dict[str, Any]:
    out = {
        "out_bill_no": bill.out_bill_no,
        "transfer_bill_no": bill.transfer_bill_no,
        "create_time": bill.create_time,
        "state": bill.state,
    }
    if bill.state == "WAIT_USER_CONFIRM":
        out["package_info"] = bill.package_info
    return out


async def _named_bill(request: web.Request) -> tuple[FakeWeChatPay, FakeBill | web.Response]:
    """The bill the path names, or the answer that refuses the request (as ``_body``, or
    404 for a number never seen)."""
    fake, _, refused = await _body(request)
    if refused is not None:
        return fake, refused
    bill = fake.bills.get(request.match_info["out_bill_no"])
    if bill is None:
        return fake, fake.error(404, "NOT_FOUND", "记录不存在")
    return fake, bill


async def query_bill(request: web.Request) -> web.Response:
    """GET .../transfer-bills/out-bill-no/{out_bill_no}."""
    fake, bill = await _named_bill(request)
    if isinstance(bill, web.Response):
        return bill
    return fake.answer(200, fake.view(bill))


async def cancel_bill(request: web.Request) -> web.Response:
    """POST .../transfer-bills/out-bill-no/{out_bill_no}/cancel."""
    fake, bill = await _named_bill(request)
    if isinstance(bill, web.Response):
        return bill
    if bill.state in ("ACCEPTED", "PROCESSING", "WAIT_USER_CONFIRM"):
        if fake.faults.balance_fen is not None:
            fake.faults.balance_fen += bill.transfer_amount
        fake.move(bill, "CANCELING", "用户未确认收款，商户撤销")
        fake.spawn(fake._finish_cancel(bill))
    elif bill.state not in ("CANCELING", "CANCELLED"):
        return fake.error(400, "INVALID_REQUEST", "单据状态不支持撤销")
    return fake.answer(
        200,
        {
            "out_bill_no": bill.out_bill_no,
            "transfer_bill_no": bill.transfer_bill_no,
            "state": bill.state,
            "update_time": bill.update_time,
        },
    )


_CONFIRM = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>确认收款（模拟）</title>
<style>body{{margin:0;font-family:-apple-system,"PingFang SC","Noto Sans CJK SC",sans-serif;
background:#ededed;color:#111}}main{{max-width:360px;margin:0 auto;padding:48px 24px;
text-align:center}}.badge{{display:inline-block;font-size:12px;color:#fff;background:#888;
border-radius:4px;padding:2px 6px}}.amount{{font-size:36px;margin:24px 0 8px}}
p{{color:#555}}button{{display:block;width:100%;margin-top:24px;padding:13px;border:0;
border-radius:8px;font-size:17px;background:#07c160;color:#fff}}</style></head><body><main>
<span class="badge">模拟微信支付 · 仅供本地开发</span><h1>确认收款</h1>
<div class="amount" id="amount">¥{yuan}</div><p>{remark}</p><p>{state}</p>
<form method="post" action="/fake/confirm">
<input type="hidden" name="package" value="{package}">
<input type="hidden" name="return" value="{back}">
<button type="submit" id="confirm">确认收款</button></form></main></body></html>
"""


def _by_package(fake: FakeWeChatPay, package: str) -> FakeBill | None:
    return next((b for b in fake.bills.values() if b.package_info == package), None)


def _safe_return(raw: str) -> str:
    back = URL(raw)
    return raw if back.is_absolute() and back.scheme in ("http", "https") else "/"


async def confirm_page(request: web.Request) -> web.Response:
    """GET /fake/confirm?package=P&return=URL: the player's 确认收款 page."""
    fake = request.app[FAKE_PAY]
    bill = _by_package(fake, request.query.get("package", ""))
    if bill is None:
        return web.Response(status=404, text="没有这笔转账", content_type="text/plain")
    page = _CONFIRM.format(
        yuan=f"{bill.transfer_amount // 100}.{bill.transfer_amount % 100:02d}",
        remark=html.escape(bill.transfer_remark),
        state=html.escape(bill.state),
        package=html.escape(bill.package_info),
        back=html.escape(_safe_return(request.query.get("return", "/"))),
    )
    return web.Response(text=page, content_type="text/html")


async def confirm_submit(request: web.Request) -> web.Response:
    """POST /fake/confirm: the player pressed 确认收款; back to the merchant's page."""
    fake = request.app[FAKE_PAY]
    form = await request.post()
    bill = _by_package(fake, str(form.get("package", "")))
    if bill is None:
        return web.Response(status=404, text="没有这笔转账", content_type="text/plain")
    fake.confirm(bill)
    return web.Response(status=302, headers={"Location": _safe_return(str(form.get("return")))})


async def confirm_bill(request: web.Request) -> web.Response:
    """POST /fake/confirm-bill {"out_bill_no"}: a player confirms (tests)."""
    fake = request.app[FAKE_PAY]
    bill = fake.bills.get(str((await request.json()).get("out_bill_no")))
    if bill is None:
        return web.json_response({"confirmed": False}, status=404)
    return web.json_response({"confirmed": fake.confirm(bill)})


async def set_faults(request: web.Request) -> web.Response:
    """POST /fake/faults: change some fault switches; answers all of them."""
    fake = request.app[FAKE_PAY]
    changes = await request.json()
    known = {f.name for f in fields(Faults)}
    for name, value in changes.items():
        if name in known:
            setattr(fake.faults, name, value)
    return web.json_response(asdict(fake.faults))


async def ledger(request: web.Request) -> web.Response:
    """GET /fake/ledger: every bill, what was paid, and the busiest second of creates."""
    fake = request.app[FAKE_PAY]
    bills = [fake.view(b) for b in fake.bills.values()]
    return web.json_response(
        {
            "bills": bills,
            "paid": [b for b in bills if b["state"] == "SUCCESS"],
            "creates": len(fake.create_times),
            "busiest_second": fake.busiest_second(),
            "calls": fake.calls,
            "notifications_pending": sum(1 for n in fake.notifications if n["status"] != 200),
        },
        dumps=lambda v: orjson.dumps(v).decode(),
    )


async def notifications(request: web.Request) -> web.Response:
    """GET /fake/notifications: every notification sent (headers and body), to replay."""
    return web.json_response(request.app[FAKE_PAY].notifications)


def create_fake_pay_app(fake: FakeWeChatPay) -> web.Application:
    """The fake WeChat Pay as an aiohttp application."""
    app = web.Application()
    app[FAKE_PAY] = fake

    async def client(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            fake.http = http
            yield
            for task in list(fake.tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*fake.tasks, return_exceptions=True)

    app.cleanup_ctx.append(client)
    app.router.add_post(BILLS, create_bill)
    app.router.add_get(BILLS + "/out-bill-no/{out_bill_no}", query_bill)
    app.router.add_post(BILLS + "/out-bill-no/{out_bill_no}/cancel", cancel_bill)
    app.router.add_get("/fake/confirm", confirm_page)
    app.router.add_post("/fake/confirm", confirm_submit)
    app.router.add_post("/fake/confirm-bill", confirm_bill)
    app.router.add_post("/fake/faults", set_faults)
    app.router.add_get("/fake/ledger", ledger)
    app.router.add_get("/fake/notifications", notifications)
    return app


# --- key material and settings for local runs and tests --------------------------------

MERCHANT_PUBLIC_FILE = "merchant-public.pem"
LOCAL_ENV_FILE = "env.json"
PLATFORM_PRIVATE_FILE = "platform-private.pem"


def provision(directory: Path, appid: str, fake_base: str, notify_url: str) -> dict[str, str]:
    """Generate a merchant's and a platform's RSA 2048 keys and an API v3 key into
    ``directory`` (mode 0600), and return the environment both sides read."""
    directory.mkdir(parents=True, exist_ok=True)
    merchant, platform = generate_key(), generate_key()
    files = {
        "merchant-private.pem": private_pem(merchant),
        MERCHANT_PUBLIC_FILE: public_pem(merchant),
        PLATFORM_PRIVATE_FILE: private_pem(platform),
        "platform-public.pem": public_pem(platform),
    }
    for name, data in files.items():
        path = directory / name
        path.touch(mode=0o600)
        path.write_bytes(data)
    return {
        "WECHATPAY_MCHID": f"19{secrets.randbelow(10**8):08d}",
        "WECHATPAY_APPID": appid,
        "WECHATPAY_API_BASE": fake_base,
        "WECHATPAY_SERIAL_NO": secrets.token_hex(20).upper(),
        "WECHATPAY_PRIVATE_KEY_FILE": str(directory / "merchant-private.pem"),
        "WECHATPAY_PUBLIC_KEY_ID": f"PUB_KEY_ID_{secrets.randbelow(10**28):028d}",
        "WECHATPAY_PUBLIC_KEY_FILE": str(directory / "platform-public.pem"),
        "WECHATPAY_APIV3_KEY": secrets.token_hex(16),
        "WECHATPAY_NOTIFY_URL": notify_url,
        "WECHATPAY_CONFIRM_URL": f"{fake_base}/fake/confirm",
        "FAKE_WECHATPAY_KEYS_DIR": str(directory),
    }


def fake_from_env(env: dict[str, str] | None = None) -> FakeWeChatPay:
    """The fake the environment ``provision`` wrote describes."""
    env = dict(os.environ) if env is None else env
    keys = Path(env["FAKE_WECHATPAY_KEYS_DIR"])
    return FakeWeChatPay(
        mchid=env["WECHATPAY_MCHID"],
        appid=env.get("WECHATPAY_APPID") or env["WECHAT_APPID"],
        merchant_serial=env["WECHATPAY_SERIAL_NO"],
        merchant_public=load_public((keys / MERCHANT_PUBLIC_FILE).read_bytes()),
        platform_key_id=env["WECHATPAY_PUBLIC_KEY_ID"],
        platform_private=load_private((keys / PLATFORM_PRIVATE_FILE).read_bytes()),
        apiv3_key=env["WECHATPAY_APIV3_KEY"].encode(),
    )


def start_fake_wechatpay(env: dict[str, str], data_dir: Path) -> subprocess.Popen[bytes] | None:
    """Start the fake WeChat Pay with fresh keys (in ``data_dir``/wechatpay, never logged)
    and point ``env`` at it, unless a real merchant is configured (WECHATPAY_MCHID)."""
    if env.get("WECHATPAY_MCHID"):
        return None
    port = free_port()
    keys = data_dir.resolve() / "wechatpay"
    provisioned = provision(
        keys,
        env.get("WECHAT_APPID", "wxfakepay"),
        f"http://127.0.0.1:{port}",
        f"http://127.0.0.1:{env['PORT']}/api/wechatpay/notify",
    )
    # For `reconcile` and `payout-retry` from another shell against this local run.
    saved = keys / LOCAL_ENV_FILE
    saved.touch(mode=0o600)
    saved.write_bytes(orjson.dumps(provisioned))
    env.update(provisioned)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "fake-wechatpay", "--port", str(port)], env=env
    )
    _wait_port(port, proc, "fake WeChat Pay")
    return proc


def local_payout_env(data_dir: Path) -> dict[str, str]:
    """The WeChat Pay settings the last local run (``./hb serve``) gave its fake ({} if none)."""
    try:
        saved = orjson.loads((data_dir / "wechatpay" / LOCAL_ENV_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}
