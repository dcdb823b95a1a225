"""Campaigns of every kind: the definition cache, and each request sent to its kind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import asyncpg
from redis.asyncio import Redis

from app.background.events import Events
from app.campaigns import definitions, listing, winners
from app.campaigns.lifecycle import Lifecycles
from app.campaigns.listing import Position
from app.campaigns.winners import Winners
from app.errors import Ended, Invalid, NotFound, NotStarted, Paused, WrongKind
from app.lottery.service import DrawOutcome, Lotteries
from app.model import Campaign, Kind, now_ms
from app.payout.service import PayoutService
from app.redpacket.service import GrabOutcome, RedPackets
from app.redpacket.spec import RedPacketSpec
from app.reports import Progress
from app.store.scripts import POOL_SEPARATOR, CampaignKeys, RedisClock, Scripts

log = logging.getLogger("hongbao.campaigns")
# No campaign id holds a brace: it would break out of its keys' hash tag.
_NOT_IN_IDS = frozenset("{}")
T = TypeVar("T")
# The payout part of a view lives in PostgreSQL; everything else in Redis. While
# PostgreSQL is down or slow, views answer without it within this long.
LEDGER_READ_S = 1.0

KINDS = ", ".join(f"'{k}'" for k in Kind)


class CampaignService:
    """Definitions (cached per worker; they never change) with their lifecycle beside
    (app.campaigns.lifecycle), and grabs, draws and views handed to the campaign's kind."""

    def __init__(
        self,
        redis: Redis,
        pg: asyncpg.Pool,
        scripts: Scripts,
        *,
        batch_max: int,
        events: Events | None = None,
        clock: Callable[[], int] = now_ms,
        payouts: PayoutService | None = None,
    ) -> None:
        self._redis = redis
        self._pg = pg
        self._payouts = payouts
        # ``clock`` is this worker's; every script reply corrects it to Redis's clock,
        # the one that decides windows, release slots and the quota day.
        self._clock = RedisClock(clock)
        self.red_packets = RedPackets(
            redis, pg, scripts, batch_max=batch_max, events=events, clock=self._clock
        )
        self.lotteries = Lotteries(redis, pg, scripts, batch_max=batch_max, clock=self._clock)
        self._cache: dict[str, Campaign[Any]] = {}
        self.lifecycles = Lifecycles(redis, scripts, events)
        self._fetching: dict[str, asyncio.Future[Campaign[Any]]] = {}

    async def create(
        self, data: Mapping[str, Any], progress: Progress | None = None
    ) -> Campaign[Any]:
        """Create a campaign of the kind ``data`` names (validated by that kind);
        ``progress`` follows each phase (app.reports.Phase) as it goes."""
        raw = data.get("kind")
        kind = Kind(raw) if isinstance(raw, str) and raw in set(Kind) else None
        if kind is Kind.RED_PACKET:
            return await self.red_packets.create(data, progress)
        if kind is Kind.LOTTERY:
            return await self.lotteries.create(data, progress)
        raise Invalid("kind", f"kind must be one of {KINDS}")

    async def get(self, campaign_id: str) -> Campaign[Any]:
        """The definition of ``campaign_id`` (404 if unknown)."""
        cached = self._cache.get(campaign_id)
        if cached is not None:
            return cached
        if (
            not (0 < len(campaign_id) <= 64)
            or not _NOT_IN_IDS.isdisjoint(campaign_id)
            # A sub-pool's id (the router unquotes %2F into the route's {id}).
            or POOL_SEPARATOR in campaign_id
        ):
            raise NotFound("no such campaign")
        # Single flight: at an opening burst a cold worker reads the definition once,
        # however many requests are waiting for it.
        fetching = self._fetching.get(campaign_id)
        if fetching is None:
            fetching = asyncio.ensure_future(self._fetch(campaign_id))
            self._fetching[campaign_id] = fetching
            fetching.add_done_callback(lambda _: self._fetching.pop(campaign_id, None))
        # shield: a waiter that goes away must not cancel the others' fetch.
        return await asyncio.shield(fetching)

    async def _fetch(self, campaign_id: str) -> Campaign[Any]:
        mark = self.lifecycles.mark(campaign_id)
        meta = cast(
            dict[bytes, bytes], await self._redis.hgetall(CampaignKeys.of(campaign_id).meta)
        )
        if not meta:
            raise NotFound("no such campaign")
        campaign = definitions.from_meta(campaign_id, meta)
        await self.lifecycles.learn(campaign_id, meta, mark)
        self._cache[campaign_id] = campaign
        return campaign

    async def ensure_open(self, campaign_id: str) -> Campaign[Any]:
        """The campaign if its window is open now and it is not paused; 404 / 409 from
        the cached definition and lifecycle.

        Needs no Redis once the definition is cached and Redis's clock read (once per
        worker), so ended, not-started and paused campaigns are answered before any
        session lookup (paused only while the events listener is live: otherwise the
        script decides). "Now" is Redis's clock as the last script reply showed it: only a hint,
        since the script checks the window again by Redis's clock itself, so a worker
        whose clock is wrong grants nothing outside it.
        """
        # A cached definition is read without a coroutine (the hot paths' common case).
        campaign = self._cache.get(campaign_id)
        if campaign is None:
            campaign = await self.get(campaign_id)
        if not self._clock.synced:
            await self._clock.sync(self._redis)
        now = self._clock()
        life = self.lifecycles.of(campaign_id)
        if life.ended(now, campaign):
            raise Ended("the campaign has ended")
        if now < campaign.opens_ms:
            raise NotStarted("the campaign has not started yet")
        if life.paused and self.lifecycles.trusted:
            raise Paused("the campaign is paused; try again later")
        return campaign

    async def public_view(self, campaign_id: str) -> dict[str, Any]:
        """What a player sees of a campaign."""
        campaign = await self.get(campaign_id)
        life = self.lifecycles.of(campaign_id)
        if campaign.kind is Kind.LOTTERY:
            return await self.lotteries.public_view(campaign, life)
        return await self.red_packets.public_view(campaign, life)

    async def stats(self, campaign_id: str) -> dict[str, Any]:
        """Live operator statistics."""
        campaign = await self.get(campaign_id)
        if campaign.kind is Kind.LOTTERY:
            stats = await self.lotteries.stats(campaign)
        else:
            stats = await self.red_packets.stats(campaign)
        if self._payouts is not None and self._payouts.enabled:
            totals = await _from_ledger(self._payouts.totals(campaign_id))
            if totals is not None:
                stats["payouts"] = totals
        return stats

    async def list_page(
        self,
        *,
        limit: int,
        state: str | None = None,
        kind: Kind | None = None,
        after: Position | None = None,
    ) -> tuple[list[dict[str, Any]], Position | None]:
        """Operators' list: campaigns newest first with their live state (app.campaigns.listing)."""
        return await listing.page(
            self._redis, self._pg, limit=limit, state=state, kind=kind, after=after
        )

    async def winners(self, campaign_id: str) -> Winners:
        """Every grant or prize of a campaign, streamed from PostgreSQL (404 if unknown)."""
        return await winners.winners(self._pg, campaign_id)

    async def pause(self, campaign_id: str, paused: bool) -> dict[str, Any]:
        """Pause (or resume) a campaign on every worker; its stats after (409 once ended)."""
        campaign = await self.get(campaign_id)
        await self.lifecycles.pause(campaign_id, paused, _sub_pools(campaign))
        return await self.stats(campaign_id)

    async def end(self, campaign_id: str) -> dict[str, Any]:
        """End a campaign now and close it out, on every worker; its stats after."""
        campaign = await self.get(campaign_id)
        await self.lifecycles.end(campaign_id, _sub_pools(campaign))
        return await self.stats(campaign_id)

    async def my_view(self, campaign_id: str, openid: str) -> dict[str, Any]:
        """What ``openid`` has won in a campaign, as the player sees it."""
        campaign = await self.get(campaign_id)
        if campaign.kind is Kind.LOTTERY:
            view = await self.lotteries.player_view(campaign, openid)
        else:
            view = await self.red_packets.player_view(campaign, openid)
        if self._payouts is not None and self._payouts.enabled:
            # Null until the grant reaches PostgreSQL (the ledger lag), then its bills.
            # (and null while PostgreSQL cannot be read: the win itself is Redis's).
            view["payout"] = await _from_ledger(self._payouts.player_view(campaign_id, openid))
        return view

    def surely_sold_out(self, campaign: Campaign[Any], openid: str) -> bool:
        """Whether a grab of ``campaign`` by ``openid`` is "sold out" by this worker's
        memory alone (a red packet known sold out, the player among no winners)."""
        return campaign.kind is Kind.RED_PACKET and self.red_packets.surely_sold_out(
            campaign, openid
        )

    def grab(self, campaign: Campaign[Any], openid: str) -> Awaitable[GrabOutcome]:
        """Settle one grab in an open campaign (see ensure_open); WrongKind for a lottery.

        Hands back the kind's coroutine (no coroutine of its own on the hot path)."""
        if campaign.kind is not Kind.RED_PACKET:
            raise WrongKind("this campaign is a lottery; draw instead")
        return self.red_packets.grab(campaign, openid)

    def draw(
        self, campaign: Campaign[Any], openid: str, idempotency_key: str | None = None
    ) -> Awaitable[DrawOutcome]:
        """Settle one draw in an open campaign (see ensure_open); WrongKind for a red packet.

        A retry under the same ``idempotency_key`` answers the draw already made."""
        if campaign.kind is not Kind.LOTTERY:
            raise WrongKind("this campaign is not a lottery; grab it instead")
        return self.lotteries.draw(campaign, openid, idempotency_key)

    async def drain(self) -> None:
        """Finish grabs and draws in flight (graceful shutdown)."""
        await self.red_packets.drain()
        await self.lotteries.drain()
        await self.lifecycles.close()


async def _from_ledger(read: Awaitable[T]) -> T | None:
    """What ``read`` gets from PostgreSQL, or None when it is down or slower than
    LEDGER_READ_S (logged): a view never waits on, or fails with, the ledger."""
    try:
        return await asyncio.wait_for(read, LEDGER_READ_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("view answered without PostgreSQL: %s", type(exc).__name__)
        return None


def _sub_pools(campaign: Campaign[Any]) -> tuple[str, ...]:
    """A sharded red packet's sub-pools (none for any other campaign)."""
    return campaign.spec.pools if isinstance(campaign.spec, RedPacketSpec) else ()
