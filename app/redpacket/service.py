"""Red packets at run time: creation, grabs, and the player and operator views."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple, cast

import asyncpg
from redis.asyncio import Redis

from app.background.events import Events
from app.errors import Ended, NotFound, NotStarted, Paused
from app.model import Lifecycle, new_campaign_id
from app.records import LIFECYCLE_FIELDS, Envelope, lifecycle_of
from app.redpacket import pool
from app.redpacket.soldout import SoldOut
from app.redpacket.spec import RedPacket, parse
from app.reports import Phase, Progress, quiet
from app.store import ledger
from app.store.batching import KeyedBatchers
from app.store.scripts import CampaignKeys, GrabCode, GrabStatus, RedisClock, Scripts

log = logging.getLogger("hongbao.redpacket")


class GrabOutcome(NamedTuple):
    """One player's grab result (a NamedTuple: one is made per settled player)."""

    code: GrabCode
    amount_fen: int


SOLD_OUT = GrabOutcome(GrabCode.SOLD_OUT, 0)


class RedPackets:
    """Creating red packets, settling grabs (coalesced per campaign), and their views."""

    def __init__(
        self,
        redis: Redis,
        pg: asyncpg.Pool,
        scripts: Scripts,
        *,
        batch_max: int,
        events: Events | None = None,
        clock: RedisClock | None = None,
    ) -> None:
        self._redis = redis
        self._pg = pg
        self._scripts = scripts
        # Redis's clock as last seen, for views; the script decides the window.
        self._clock = clock or RedisClock()
        self._grabs: KeyedBatchers[str, tuple[GrabStatus, GrabOutcome]] = KeyedBatchers(
            self._settle, max_size=batch_max
        )
        self._lookups: KeyedBatchers[str, GrabOutcome] = KeyedBatchers(
            self._lookup, max_size=batch_max
        )
        self._sold_out = None if events is None else SoldOut(redis, events)

    async def create(self, data: Mapping[str, Any], progress: Progress | None = None) -> RedPacket:
        """Validate, split, record in PostgreSQL and load into Redis side by side, then open;
        all or nothing: a failure of either half leaves neither behind. ``progress``
        counts envelopes through each phase."""
        campaign = parse(data, new_campaign_id())
        spec = campaign.spec
        step = progress or quiet
        step(Phase.SPLIT, 0, spec.count)
        amounts = await asyncio.get_running_loop().run_in_executor(None, spec.envelopes)
        step(Phase.SPLIT, spec.count, spec.count)
        envelopes = [Envelope(seq, amount) for seq, amount in enumerate(amounts)]
        step(Phase.POSTGRESQL, 0, spec.count)
        step(Phase.REDIS, 0, spec.count)
        loaded = asyncio.ensure_future(
            pool.load(self._redis, campaign, envelopes, progress=partial(step, Phase.REDIS))
        )
        try:
            # PostgreSQL commits only once the Redis half has loaded: a failed load rolls
            # the insert back.
            await ledger.insert_campaign(
                self._pg,
                campaign,
                columns=spec.columns(),
                config=spec.config(),
                amounts=amounts,
                commit_after=loaded,
                progress=partial(step, Phase.POSTGRESQL),
            )
            await pool.open_campaign(self._redis, campaign)
        except BaseException:
            await self._discard(campaign.id, loaded)
            raise
        return campaign

    async def _discard(self, campaign_id: str, loaded: asyncio.Future[None]) -> None:
        """Undo a failed creation in both stores, as far as each answers; a pool Redis
        keeps anyway expires (pool.LOAD_TTL_S)."""
        if not loaded.done():
            loaded.cancel()
        with contextlib.suppress(BaseException):
            await loaded
        try:
            await pool.discard(self._redis, campaign_id)
        except Exception as exc:
            log.warning("failed campaign %s not removed from Redis: %s", campaign_id, exc)
        try:
            await ledger.discard_campaign(self._pg, campaign_id)
        except Exception as exc:
            log.warning("failed campaign %s not removed from PostgreSQL: %s", campaign_id, exc)

    async def grab(self, campaign: RedPacket, openid: str) -> GrabOutcome:
        """Settle one player's grab in an open campaign; raises NotFound / NotStarted /
        Ended / Paused if Redis disagrees with the cached definition and lifecycle."""
        campaign_id = campaign.id
        sold_out = self._sold_out
        if sold_out is not None and sold_out.knows(campaign):
            # Known sold out: a player not among the winners is answered from memory;
            # a winner's retry is looked up (a coalesced HMGET, not the script).
            if sold_out.surely_lost(campaign_id, openid):
                return SOLD_OUT
            return await self._lookups.submit(campaign_id, openid)
        status, outcome = await self._grabs.submit(campaign_id, openid)
        if status is GrabStatus.NOT_FOUND:
            raise NotFound("no such campaign")
        if status is GrabStatus.NOT_STARTED:
            raise NotStarted("the campaign has not started yet")
        if status is GrabStatus.ENDED:
            raise Ended("the campaign has ended")
        if status is GrabStatus.PAUSED:
            raise Paused("the campaign is paused; try again later")
        return outcome

    async def _settle(
        self, campaign_id: str, users: list[str]
    ) -> list[tuple[GrabStatus, GrabOutcome]]:
        result = await self._scripts.grab_envelope(campaign_id, users)
        self._clock.observe(result.now_ms)
        if result.status is not GrabStatus.SETTLED:
            return [(result.status, SOLD_OUT)] * len(users)
        if result.remaining_count == 0 and self._sold_out is not None:
            self._sold_out.announce(campaign_id)
        return [(result.status, GrabOutcome(code, amount)) for code, amount in result.outcomes]

    async def _lookup(self, campaign_id: str, users: list[str]) -> list[GrabOutcome]:
        raw = cast(
            list[bytes | None],
            await self._redis.hmget(CampaignKeys.of(campaign_id).winners, users),
        )
        return [
            SOLD_OUT
            if value is None
            else GrabOutcome(GrabCode.ALREADY_WON, Envelope.decode(value).amount_fen)
            for value in raw
        ]

    async def public_view(self, campaign: RedPacket, life: Lifecycle) -> dict[str, Any]:
        """What a player sees of a red packet (``life``: as this worker knows it)."""
        remaining = int(await self._redis.llen(CampaignKeys.of(campaign.id).pool))
        return {
            **campaign.summary(campaign.state(self._clock(), remaining, life)),
            "remaining_count": remaining,
            "split": str(campaign.spec.split),
        }

    async def stats(self, campaign: RedPacket) -> dict[str, Any]:
        """Live operator statistics, read as one consistent snapshot; the lifecycle is
        Redis's (refunded: 0 until the close-out)."""
        keys = CampaignKeys.of(campaign.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(keys.meta, "won_count", "won_fen", "refunded_count", "refunded_fen")
            pipe.hmget(keys.meta, *LIFECYCLE_FIELDS)
            pipe.llen(keys.pool)
            # Drainers XDEL what they commit: the stream holds exactly the unrecorded entries.
            pipe.xlen(keys.ledger)
            counters, life, remaining, ledger_lag = await pipe.execute()
        won_count, won_fen, refunded_count, refunded_fen = counters
        won_f = int(won_fen or 0)
        spec = campaign.spec
        state = campaign.state(self._clock(), int(remaining), lifecycle_of(life))
        return {
            **campaign.summary(state),
            **spec.view(),
            "remaining_count": int(remaining),
            "remaining_fen": spec.total_fen - won_f,
            "won_count": int(won_count or 0),
            "won_fen": won_f,
            "refunded_count": int(refunded_count or 0),
            "refunded_fen": int(refunded_fen or 0),
            "ledger_lag": int(ledger_lag),
        }

    async def player_view(self, campaign: RedPacket, openid: str) -> dict[str, Any]:
        """What ``openid`` has won, as the player sees it."""
        raw = cast(
            bytes | None, await self._redis.hget(CampaignKeys.of(campaign.id).winners, openid)
        )
        if raw is None:
            return {"result": "none"}
        return {"result": "won", "amount_fen": Envelope.decode(raw).amount_fen}

    async def drain(self) -> None:
        """Finish grabs in flight (graceful shutdown)."""
        await self._grabs.drain()
        await self._lookups.drain()
        if self._sold_out is not None:
            await self._sold_out.close()
