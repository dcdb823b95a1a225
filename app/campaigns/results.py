"""GET /api/campaigns/{id}/results, served from each worker's memory.

A red packet's results are final once it has given out and the ledger has caught up
(app.redpacket.results): each worker then reads them from PostgreSQL once and keeps the
serialised answer, so however many players ask, Redis sees nothing more and PostgreSQL
one query per worker. Until then the worker remembers "not finished" for PENDING_S (one
MULTI per campaign and worker that often), and a lottery's prize list for LOTTERY_S.
Concurrent requests share one computation (single flight), and every answer carries a
Cache-Control that lets HAProxy or a CDN keep it as long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from app.campaigns.service import CampaignService
from app.errors import Unavailable
from app.lottery import results as lottery
from app.model import Campaign, Kind
from app.redpacket import results as red_packet

log = logging.getLogger("hongbao.results")

# A final answer never changes: caches may keep it for an hour.
FINAL_MAX_AGE_S = 3600
# Not finished yet: ask Redis again after this long.
PENDING_S = 2
# A lottery's prize list, recounted this often.
LOTTERY_S = 5
# Answers a worker keeps (a few KB each); past this the oldest are forgotten.
KEPT_MAX = 10_000
# How long a request waits for the shared computation before a 503 (which goes on, and
# serves the next request).
WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class Published:
    """One answer: its status, serialised body and how long it may be kept."""

    status: int
    body: bytes
    max_age_s: int
    # monotonic seconds after which the worker asks again (None: never, it is final)
    expires: float | None

    @property
    def cache_control(self) -> str:
        """The Cache-Control header that lets shared caches keep it as long."""
        return f"public, max-age={self.max_age_s}"


_NOT_FINISHED = orjson.dumps(
    {
        "error": "not_finished",
        "message": "the results are shown once the red packet has sold out or ended",
    }
)


class Results:
    """Each campaign's public results, cached in this worker."""

    def __init__(
        self,
        campaigns: CampaignService,
        redis: Redis,
        pg: asyncpg.Pool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._campaigns = campaigns
        self._redis = redis
        self._pg = pg
        self._clock = clock
        self._kept: dict[str, Published] = {}
        self._flights: dict[str, asyncio.Future[Published]] = {}

    async def get(self, campaign_id: str) -> Published:
        """The results of ``campaign_id`` (404 if unknown; 503 if PostgreSQL cannot be
        read within WAIT_S)."""
        campaign = await self._campaigns.get(campaign_id)
        kept = self._kept.get(campaign_id)
        if kept is not None and (kept.expires is None or self._clock() < kept.expires):
            return kept
        flight = self._flights.get(campaign_id)
        if flight is None:
            flight = asyncio.ensure_future(self._compute(campaign))
            self._flights[campaign_id] = flight
            flight.add_done_callback(lambda done: self._landed(campaign_id, done))
        try:
            # shield: a waiter that gives up must not cancel the others' computation.
            return await asyncio.wait_for(asyncio.shield(flight), WAIT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("results of %s not read: %s", campaign_id, type(exc).__name__)
            raise Unavailable("the results cannot be read right now; try again soon") from None

    def _landed(self, campaign_id: str, flight: asyncio.Future[Published]) -> None:
        self._flights.pop(campaign_id, None)
        # Retrieved here too, in case every waiter gave up (WAIT_S) before it failed.
        if not flight.cancelled():
            flight.exception()

    async def _compute(self, campaign: Campaign[Any]) -> Published:
        now = self._clock()
        if campaign.kind is Kind.LOTTERY:
            state = (await self._campaigns.public_view(campaign.id))["state"]
            body = await lottery.tally(self._pg, campaign, state)
            published = Published(200, orjson.dumps(body), LOTTERY_S, now + LOTTERY_S)
        else:
            final = await red_packet.tally(self._redis, self._pg, campaign)
            if final is None:
                published = Published(409, _NOT_FINISHED, PENDING_S, now + PENDING_S)
            else:
                published = Published(200, orjson.dumps(final), FINAL_MAX_AGE_S, None)
                # Once per campaign and worker (unless forgotten past KEPT_MAX).
                log.info("results of %s are final: %s winners", campaign.id, final["won_count"])
        self._keep(campaign.id, published)
        return published

    def _keep(self, campaign_id: str, published: Published) -> None:
        self._kept.pop(campaign_id, None)
        self._kept[campaign_id] = published
        if len(self._kept) > KEPT_MAX:
            del self._kept[next(iter(self._kept))]
