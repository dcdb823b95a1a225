"""The payout worker: turns outbox rows into WeChat Pay transfer bills and follows them.

Exactly once, under every fault: a bill's number is fixed before the first request, the
row says ``sent`` before a create request leaves, and any bill that was ever sent is
first queried under that same number, so a time-out, a 5xx or a worker killed mid-call
is resolved by asking, never by creating another bill. States only move forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
from redis.exceptions import RedisError

from app.background.tasks import stop_loop
from app.payout.client import Refused, Unclear, WeChatPayClient
from app.payout.ratelimit import SharedLimit
from app.settings import PayoutSettings
from app.store import ledger, payouts
from app.store.client import open_redis
from app.store.payouts import NEW, STATES, Bill

log = logging.getLogger("hongbao.payout")

# WeChat's answer to too many requests: every process waits this long.
RATE_LIMITED_PAUSE_S = 1.0
# Codes after which the same request can succeed later: every process pauses and the
# bill stays as it is. 商户余额不足 (NOT_ENOUGH): WeChat says to retry the same bill once
# the merchant has topped up; we look again every PAYOUT_RETRY_MAX_S.
_PAUSE_CODES = ("FREQUENCY_LIMITED", "NOT_ENOUGH")
IDLE_S = 0.5


def back_off(attempts: int, ceiling_s: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones (jittered, capped)."""
    return float(min(ceiling_s, 0.5 * 2 ** min(attempts, 16)) * random.uniform(0.5, 1.0))


class PayoutWorker:
    """One payout process's loop over the outbox."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: WeChatPayClient,
        limit: SharedLimit,
        settings: PayoutSettings,
    ) -> None:
        self._pool = pool
        self._client = client
        self._limit = limit
        self._settings = settings
        self._names: dict[str, str] = {}
        self.calls = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; the batch in hand is finished first."""
        failures = 0
        while not stop.is_set():
            try:
                bills = await payouts.lease_due(
                    self._pool, self._settings.batch_max, self._settings.lease_s
                )
                failures = 0
            except (OSError, asyncpg.PostgresError) as exc:
                failures += 1
                log.warning("payout outbox unreachable: %r", exc)
                await _sleep(stop, back_off(failures, self._settings.retry_max_s))
                continue
            if not bills:
                await _sleep(stop, IDLE_S)
                continue
            await asyncio.gather(*(self.step(bill) for bill in bills))

    async def step(self, bill: Bill) -> None:
        """Move one leased bill on, as far as one call to WeChat Pay can."""
        try:
            if bill.state == NEW:
                await self._create(bill)
            elif bill.state == "WAIT_USER_CONFIRM" and self._expired(bill):
                await self._cancel(bill)
            else:
                await self._follow(bill)
        except Unclear as exc:
            log.info("bill %s unclear, will query: %s", bill.out_bill_no, exc)
            await payouts.reschedule(
                self._pool,
                bill.out_bill_no,
                back_off(bill.attempts, self._settings.retry_max_s),
                failed=True,
            )
        except Refused as exc:
            await self._refused(bill, exc)
        except (OSError, asyncpg.PostgresError, RedisError) as exc:
            # The lease runs out and another pass (or worker) picks the bill up again.
            log.warning("bill %s: store error %r", bill.out_bill_no, exc)

    def _expired(self, bill: Bill) -> bool:
        since = bill.waiting_since
        return since is not None and (
            (datetime.now(UTC) - since).total_seconds() >= self._settings.confirm_timeout_s
        )

    async def _activity(self, campaign_id: str) -> str:
        name = self._names.get(campaign_id)
        if name is None:
            row = await ledger.fetch_campaign(self._pool, campaign_id)
            name = self._names[campaign_id] = "" if row is None else str(row["name"])
        return name

    async def _create(self, bill: Bill) -> None:
        if bill.sent:
            # A create under this number may have reached WeChat: ask before sending again.
            self.calls += 1
            try:
                found = await self._client.query(bill.out_bill_no)
            except Refused as exc:
                if exc.code in _PAUSE_CODES or exc.status in (401, 429):
                    raise
                # Whatever else the query says, it does not say there is no bill.
                raise Unclear(f"query refused: {exc}") from None
            if found is not None:
                await self._adopt(bill, found)
                return
        await payouts.mark_sent(self._pool, bill.out_bill_no)
        self.calls += 1
        answer = await self._client.create(
            bill.out_bill_no, bill.openid, bill.amount_fen, await self._activity(bill.campaign_id)
        )
        await self._adopt(bill, answer)

    async def _follow(self, bill: Bill) -> None:
        self.calls += 1
        found = await self._client.query(bill.out_bill_no)
        if found is None:
            # Only a bill whose create we know was answered gets here; WeChat forgetting
            # it is for an operator to look at, never a reason to create another.
            log.error("bill %s (%s) unknown to WeChat Pay", bill.out_bill_no, bill.state)
            await payouts.reschedule(self._pool, bill.out_bill_no, self._settings.retry_max_s)
            return
        await self._adopt(bill, found)

    async def _cancel(self, bill: Bill) -> None:
        log.info(
            "bill %s unconfirmed for %ss: cancelling",
            bill.out_bill_no,
            self._settings.confirm_timeout_s,
        )
        self.calls += 1
        try:
            answer = await self._client.cancel(bill.out_bill_no)
        except Refused as exc:
            if exc.status >= 500 or exc.code in _PAUSE_CODES:
                raise
            # Not cancellable any more (the player confirmed meanwhile): see what it is.
            await self._follow(bill)
            return
        await self._adopt(bill, answer)

    async def _adopt(self, bill: Bill, answer: dict[str, Any]) -> None:
        state = answer.get("state")
        if answer.get("out_bill_no") != bill.out_bill_no or state not in STATES or state == NEW:
            raise Unclear(f"answer about another bill or without a state: {answer!r:.200}")
        for name, ours in (("transfer_amount", bill.amount_fen), ("openid", bill.openid)):
            if name in answer and answer[name] != ours:
                log.error("bill %s: WeChat Pay has %s=%r", bill.out_bill_no, name, answer[name])
                raise Unclear(f"WeChat Pay's {name} differs from ours")
        await payouts.advance(
            self._pool,
            bill.out_bill_no,
            str(state),
            transfer_bill_no=_text(answer.get("transfer_bill_no")),
            package_info=_text(answer.get("package_info")),
            fail_reason=_text(answer.get("fail_reason")),
        )
        if state in payouts.FINAL:
            await payouts.reschedule(self._pool, bill.out_bill_no, 0)
            return
        delay: float = self._settings.poll_s
        if state == "WAIT_USER_CONFIRM":
            delay = min(delay, self._settings.confirm_timeout_s)
        await payouts.reschedule(self._pool, bill.out_bill_no, delay)

    async def _refused(self, bill: Bill, exc: Refused) -> None:
        pause: float | None = None
        if exc.code == "FREQUENCY_LIMITED" or exc.status == 429:
            pause = RATE_LIMITED_PAUSE_S
        elif exc.code == "NOT_ENOUGH":
            pause = self._settings.retry_max_s
        if pause is None and exc.status == 401:
            # Our signature or merchant configuration is wrong: nothing works until fixed.
            pause = self._settings.retry_max_s
            log.error("WeChat Pay refused our credentials: %s", exc)
        if pause is not None:
            log.warning("WeChat Pay says %s: every payout process pauses %.0fs", exc, pause)
            await self._limit.pause(pause)
            await payouts.reschedule(self._pool, bill.out_bill_no, pause)
            return
        if bill.state != NEW:
            # A query or cancel refused: the bill itself is as it was; look again later.
            log.warning("bill %s: %s", bill.out_bill_no, exc)
            await payouts.reschedule(
                self._pool, bill.out_bill_no, back_off(bill.attempts, self._settings.retry_max_s)
            )
            return
        # A create refused for its parameters (PARAM_ERROR, INVALID_REQUEST, NO_AUTH, ...):
        # WeChat made no bill; it fails, and `payout-retry` may try it again.
        log.warning("bill %s failed: %s", bill.out_bill_no, exc)
        await payouts.advance(
            self._pool, bill.out_bill_no, "FAIL", fail_reason=f"{exc.code}: {exc.message}"[:200]
        )
        await payouts.reschedule(self._pool, bill.out_bill_no, 0)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def payout_process(
    redis_url: str, database_url: str, settings: PayoutSettings, cluster: bool = False
) -> None:
    """``python -m app payout``: one payout worker until SIGTERM or SIGINT (``cluster``:
    ``redis_url`` is a node of a Redis Cluster)."""
    if not settings.enabled:
        raise RuntimeError("payouts are off: set WECHATPAY_MCHID and the WeChat Pay keys")
    redis = open_redis(redis_url, cluster=cluster)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await ledger.migrate(pool)
        limit = SharedLimit(redis, settings.rate_per_s)
        await limit.preload()
        async with aiohttp.ClientSession() as http:
            worker = PayoutWorker(pool, WeChatPayClient(http, settings, limit), limit, settings)
            task = asyncio.create_task(worker.run(stop), name="payout")
            await stop.wait()
            # The batch in hand finishes (its calls are bounded); then the loop ends.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), settings.http_timeout_s + 5)
            await stop_loop(task, stop)
    finally:
        await pool.close()
        await redis.aclose()
