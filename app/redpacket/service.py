"""Red packets at run time: creation, grabs, and the player and operator views."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Mapping
from functools import partial
from typing import Any, NamedTuple, cast

import asyncpg
from redis.asyncio import Redis

from app.background.events import Events
from app.errors import Ended, NotFound, NotStarted, Paused, Unavailable
from app.model import Lifecycle, new_campaign_id
from app.records import LIFECYCLE_FIELDS, Envelope, lifecycle_of
from app.redpacket import pool, routing
from app.redpacket.soldout import SoldOut
from app.redpacket.spec import RedPacket, parse, pools_of
from app.reports import Phase, Progress, Totals, quiet
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
        loop = asyncio.get_running_loop()
        # Off the loop: placing 256 sub-pools' slots takes a few hundred milliseconds.
        campaign = await loop.run_in_executor(None, parse, data, new_campaign_id())
        spec = campaign.spec
        step = progress or quiet
        step(Phase.SPLIT, 0, spec.count)
        amounts = await loop.run_in_executor(None, spec.envelopes)
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
            sub_pools = [
                pool.SubPool(Totals.of(e.amount_fen for e in dealt))
                for dealt in pool.deal(campaign, envelopes)
            ]
            await pool.open_campaign(
                self._redis, campaign, sub_pools=sub_pools if spec.shards > 1 else ()
            )
        except BaseException:
            await self._discard(campaign, loaded)
            raise
        return campaign

    async def _discard(self, campaign: RedPacket, loaded: asyncio.Future[None]) -> None:
        """Undo a failed creation in both stores, as far as each answers; a pool Redis
        keeps anyway expires (pool.LOAD_TTL_S)."""
        if not loaded.done():
            loaded.cancel()
        with contextlib.suppress(BaseException):
            await loaded
        try:
            await pool.discard(self._redis, campaign)
        except Exception as exc:
            log.warning("failed campaign %s not removed from Redis: %s", campaign.id, exc)
        try:
            await ledger.discard_campaign(self._pg, campaign.id)
        except Exception as exc:
            log.warning("failed campaign %s not removed from PostgreSQL: %s", campaign.id, exc)

    def grab(self, campaign: RedPacket, openid: str) -> Awaitable[GrabOutcome]:
        """Settle one player's grab in an open campaign; raises NotFound / NotStarted /
        Ended / Paused if Redis disagrees with the cached definition and lifecycle.
        A sharded campaign's grab visits its sub-pools in the player's order
        (app.redpacket.routing) until one grants or shows the player's win."""
        pools = campaign.spec.pools
        if pools:
            return self._grab_sharded(campaign, pools, openid)
        return self._grab_pool(campaign, campaign.id, openid)

    def surely_sold_out(self, campaign: RedPacket, openid: str) -> bool:
        """Whether this worker knows every pool of ``campaign`` is sold out and
        ``openid`` won in none of them: the grab's answer, with no Redis call."""
        sold_out = self._sold_out
        if sold_out is None:
            return False
        return all(
            sold_out.knows(campaign, pool_id) and sold_out.surely_lost(pool_id, openid)
            for pool_id in campaign.spec.pools or (campaign.id,)
        )

    async def _grab_sharded(
        self, campaign: RedPacket, pools: tuple[str, ...], openid: str
    ) -> GrabOutcome:
        for pool_id in routing.order(pools, openid):
            outcome = await self._grab_pool(campaign, pool_id, openid)
            if outcome.code is not GrabCode.SOLD_OUT:
                return outcome
        return SOLD_OUT

    async def _grab_pool(self, campaign: RedPacket, pool_id: str, openid: str) -> GrabOutcome:
        """One grab on one pool (the campaign's own, or a sub-pool)."""
        sold_out = self._sold_out
        if sold_out is not None and sold_out.knows(campaign, pool_id):
            # Known sold out: a player not among the winners is answered from memory;
            # a winner's retry is looked up (a coalesced HMGET, not the script).
            if sold_out.surely_lost(pool_id, openid):
                return SOLD_OUT
            return await self._lookups.submit(pool_id, openid)
        status, outcome = await self._grabs.submit(pool_id, openid)
        if status is GrabStatus.NOT_FOUND:
            if pool_id != campaign.id:
                # A sub-pool lost from Redis (until `rebuild`): skipping it could grant a
                # second envelope to a player who won there, so the grab waits for it.
                raise Unavailable("part of the campaign is being restored; try again later")
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
        winners = CampaignKeys.of(campaign_id).winners
        line = self._scripts.line
        # On the hot path's line when there is one, as the sessions' MGET.
        raw = cast(
            list[bytes | None],
            await (
                line.call("HMGET", winners, *users)
                if line is not None
                else self._redis.hmget(winners, users)
            ),
        )
        return [
            SOLD_OUT
            if value is None
            else GrabOutcome(GrabCode.ALREADY_WON, Envelope.decode(value).amount_fen)
            for value in raw
        ]

    async def _remaining(self, campaign: RedPacket) -> list[int]:
        """Envelopes left in each pool (sub-pools: one pipeline, per shard on a cluster)."""
        pools = campaign.spec.pools
        if not pools:
            return [int(await self._redis.llen(CampaignKeys.of(campaign.id).pool))]
        async with self._redis.pipeline(transaction=False) as pipe:
            for pool_id in pools:
                pipe.llen(CampaignKeys.of(pool_id).pool)
            return [int(n) for n in await pipe.execute()]

    async def public_view(self, campaign: RedPacket, life: Lifecycle) -> dict[str, Any]:
        """What a player sees of a red packet (``life``: as this worker knows it)."""
        remaining = sum(await self._remaining(campaign))
        return {
            **campaign.summary(campaign.state(self._clock(), remaining, life)),
            "remaining_count": remaining,
            "split": str(campaign.spec.split),
        }

    async def stats(self, campaign: RedPacket) -> dict[str, Any]:
        """Live operator statistics; the lifecycle is Redis's (refunded: 0 until the
        close-out). One consistent snapshot (a MULTI) of an unsharded campaign; a sharded
        one's is a snapshot per sub-pool, read in one pipeline (a MULTI cannot span
        slots), with ``per_shard`` what each sub-pool has left."""
        pools = pools_of(campaign)
        async with self._redis.pipeline(transaction=len(pools) == 1) as pipe:
            pipe.hmget(CampaignKeys.of(campaign.id).meta, *LIFECYCLE_FIELDS)
            for pool_id in pools:
                keys = CampaignKeys.of(pool_id)
                pipe.hmget(
                    keys.meta, "won_count", "won_fen", "refunded_count", "refunded_fen", "total_fen"
                )
                pipe.llen(keys.pool)
                # Drainers XDEL what they commit: the stream holds exactly the unrecorded
                # entries.
                pipe.xlen(keys.ledger)
            life, *replies = await pipe.execute()
        spec = campaign.spec
        per_shard = []
        ledger_lag = 0
        for shard in range(len(pools)):
            counters, remaining, lag = replies[3 * shard : 3 * shard + 3]
            won_count, won_fen, refunded_count, refunded_fen, total_fen = (
                int(v or 0) for v in counters
            )
            per_shard.append(
                {
                    "shard": shard,
                    "remaining_count": int(remaining),
                    # A sub-pool's budget is its meta's (0 while it is lost from Redis).
                    "remaining_fen": (total_fen if len(pools) > 1 else spec.total_fen) - won_fen,
                    "won_count": won_count,
                    "won_fen": won_fen,
                    "refunded_count": refunded_count,
                    "refunded_fen": refunded_fen,
                }
            )
            ledger_lag += int(lag)

        def total(name: str) -> int:
            return sum(int(s[name]) for s in per_shard)

        remaining = total("remaining_count")
        state = campaign.state(self._clock(), remaining, lifecycle_of(life))
        return {
            **campaign.summary(state),
            **spec.view(),
            "remaining_count": remaining,
            "remaining_fen": spec.total_fen - total("won_fen"),
            "won_count": total("won_count"),
            "won_fen": total("won_fen"),
            "refunded_count": total("refunded_count"),
            "refunded_fen": total("refunded_fen"),
            "ledger_lag": ledger_lag,
            "per_shard": per_shard,
        }

    async def player_view(self, campaign: RedPacket, openid: str) -> dict[str, Any]:
        """What ``openid`` has won, as the player sees it (in whichever sub-pool)."""
        pools = campaign.spec.pools
        if not pools:
            found = [await self._redis.hget(CampaignKeys.of(campaign.id).winners, openid)]
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for pool_id in pools:
                    pipe.hget(CampaignKeys.of(pool_id).winners, openid)
                found = await pipe.execute()
        raw = next((cast(bytes, value) for value in found if value is not None), None)
        if raw is None:
            return {"result": "none"}
        return {"result": "won", "amount_fen": Envelope.decode(raw).amount_fen}

    async def drain(self) -> None:
        """Finish grabs in flight (graceful shutdown)."""
        await self._grabs.drain()
        await self._lookups.drain()
        if self._sold_out is not None:
            await self._sold_out.close()
