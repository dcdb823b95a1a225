"""Pause, resume and end: operators' changes to a campaign, coherent across workers.

Redis decides. ``set_paused.lua`` and ``close_campaign.lua`` change the campaign's meta
hash, which the settlement scripts read in the same HMGET as the window: from the call
on, no worker grants or draws while it is paused or after it ended (``end`` moves
``ends_at_ms`` to Redis's now and closes the campaign out in the same step).

Each worker keeps the lifecycle beside the immutable definition it caches, for its
pre-checks (``CampaignService.ensure_open``) and views, updated by the events channel
(``paused <id>``, ``resumed <id>``, ``ended <id> <ms>``); on every (re)subscription it
re-reads the lifecycle of the campaigns it holds. "Paused" is trusted only while the
listener is live (otherwise the script decides, so a missed resume costs a script call,
never a refusal); "ended" only ever comes sooner, so it is always trusted.

PostgreSQL follows through the ledger stream: the scripts append the pause and the
close-out to it, and the drainers record them (``campaigns.paused``, ``closeouts``,
``campaigns.ended_at``), retrying while PostgreSQL is down like any grant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.background.events import Events, publish
from app.errors import Ended, NotFound
from app.model import ACTIVE, Lifecycle
from app.records import LIFECYCLE_FIELDS, decode_lifecycle, lifecycle_of
from app.store.scripts import (
    CAMPAIGNS_SET,
    CampaignKeys,
    CloseStatus,
    PauseStatus,
    Scripts,
)

log = logging.getLogger("hongbao.lifecycle")
# Passes over a sharded campaign's sub-pools while pauses and resumes race (each pass
# follows the campaign's meta as last read): beyond this, operators toggling faster
# than a pass; the last of them passes again.
PAUSE_PASSES = 10

# A read of a campaign's lifecycle that an event overtook is read again, this often.
READ_TRIES = 3


def _pause(life: Lifecycle) -> Lifecycle:
    return dataclasses.replace(life, paused=True)


def _resume(life: Lifecycle) -> Lifecycle:
    return dataclasses.replace(life, paused=False)


class Lifecycles:
    """This worker's knowledge of campaigns' lifecycles, and the operators' changes."""

    def __init__(self, redis: Redis, scripts: Scripts, events: Events | None = None) -> None:
        self._redis = redis
        self._scripts = scripts
        self._events = events
        self._known: dict[str, Lifecycle] = {}
        # Events seen per campaign: a read of Redis that one overtook is not kept.
        self._seen: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        if events is not None:
            events.on("paused", lambda cid: self._change(cid, _pause))
            events.on("resumed", lambda cid: self._change(cid, _resume))
            events.on("ended", self._ended)
            events.on("reset", self._reset)
            events.on_resync(self._resync)

    def of(self, campaign_id: str) -> Lifecycle:
        """The campaign's lifecycle as this worker knows it."""
        return self._known.get(campaign_id, ACTIVE)

    @property
    def trusted(self) -> bool:
        """Whether "paused" in memory may refuse a grab (the listener is live)."""
        return self._events is not None and self._events.live

    def mark(self, campaign_id: str) -> int:
        """Call before reading the campaign's meta; pass to ``learn`` with what was read."""
        return self._seen.get(campaign_id, 0)

    async def learn(self, campaign_id: str, meta: dict[bytes, bytes], mark: int) -> None:
        """Keep the lifecycle of a meta hash read after ``mark``, unless an event came in
        between (then read it again)."""
        if self._seen.get(campaign_id, 0) == mark:
            self._known[campaign_id] = decode_lifecycle(meta)
        else:
            await self.refresh([campaign_id])

    async def refresh(self, ids: list[str]) -> None:
        """Re-read the lifecycle of ``ids`` from Redis (one pipeline per try)."""
        for _ in range(READ_TRIES):
            if not ids:
                return
            marks = [self.mark(cid) for cid in ids]
            async with self._redis.pipeline(transaction=False) as pipe:
                for cid in ids:
                    pipe.hmget(CampaignKeys.of(cid).meta, *LIFECYCLE_FIELDS)
                replies = cast(list[list[bytes | None]], await pipe.execute())
            again = []
            for cid, mark, values in zip(ids, marks, replies, strict=True):
                if self.mark(cid) != mark:
                    again.append(cid)
                elif values[1] is not None:  # meta exists
                    self._known[cid] = lifecycle_of(values)
            ids = again

    def _change(self, campaign_id: str, update: Callable[[Lifecycle], Lifecycle]) -> None:
        self._seen[campaign_id] = self._seen.get(campaign_id, 0) + 1
        known = self._known.get(campaign_id)
        if known is not None:
            self._known[campaign_id] = update(known)

    def _ended(self, argument: str) -> None:
        campaign_id, _, raw = argument.partition(" ")
        ends = int(raw)  # ValueError: a malformed event, logged by the listener
        self._change(
            campaign_id, lambda life: dataclasses.replace(life, closed=True, ends_at_ms=ends)
        )

    def _reset(self, campaign_id: str) -> None:
        """A rebuild restored the campaign from PostgreSQL: read its lifecycle again."""
        self._seen[campaign_id] = self._seen.get(campaign_id, 0) + 1
        if campaign_id in self._known:
            task = asyncio.get_running_loop().create_task(self._reread(campaign_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reread(self, campaign_id: str) -> None:
        try:
            await self.refresh([campaign_id])
        except RedisError as exc:
            log.warning("lifecycle of %s not re-read after a rebuild: %r", campaign_id, exc)

    async def _resync(self) -> None:
        await self.refresh(list(self._known))

    async def pause(self, campaign_id: str, paused: bool, pools: tuple[str, ...] = ()) -> None:
        """Pause (or resume) a campaign; 404 unknown, 409 ended. A repeat changes nothing.

        The campaign's own meta decides; then its sub-pools (``pools``, a sharded red
        packet's) are each set as that meta says, again until a re-read shows it
        unchanged, so a pause and a resume racing (from two operators or workers) leave
        every sub-pool as the campaign, whichever came last: the last writer of the
        sub-pools re-reads the campaign after writing them.
        """
        status, _ = await self._scripts.set_paused(campaign_id, paused)
        if status is PauseStatus.NOT_FOUND:
            raise NotFound("no such campaign")
        if status is PauseStatus.ENDED:
            raise Ended("the campaign has ended")
        if pools:
            await self._pause_sub_pools(campaign_id, pools, paused)
        # Published on a repeat too: it heals a worker that missed the first.
        await self._announce("paused" if paused else "resumed", campaign_id)

    async def _pause_sub_pools(
        self, campaign_id: str, pools: tuple[str, ...], paused: bool
    ) -> None:
        meta = CampaignKeys.of(campaign_id).meta
        for _ in range(PAUSE_PASSES):
            for pool in pools:
                # Each sub-pool's script refuses its grabs from its call on; an ended or
                # lost sub-pool has nothing to refuse.
                sub, _ = await self._scripts.set_paused(pool, paused)
                if sub is PauseStatus.NOT_FOUND:
                    log.warning("sub-pool %s of %s missing from Redis: not set", pool, campaign_id)
            now = await self._redis.hget(meta, "paused") == b"1"
            if now == paused:
                return
            paused = now
        log.warning("sub-pools of %s still changing after %d passes", campaign_id, PAUSE_PASSES)

    async def end(self, campaign_id: str, pools: tuple[str, ...] = ()) -> None:
        """End a campaign now and close it out (once; a repeat changes nothing), each of
        its sub-pools (``pools``) first, then its own meta, whose end is therefore the
        latest of all; 404 unknown."""
        for pool in pools:
            sub = await self._scripts.close_campaign(pool, end_now=True)
            if sub.status is CloseStatus.CLOSED:
                await self._redis.sadd(CAMPAIGNS_SET, pool)
            elif sub.status is CloseStatus.NOT_FOUND:
                log.warning("sub-pool %s of %s missing from Redis: not closed", pool, campaign_id)
        closed = await self._scripts.close_campaign(campaign_id, end_now=True)
        if closed.status is CloseStatus.NOT_FOUND:
            raise NotFound("no such campaign")
        if closed.status is CloseStatus.CLOSED:
            # The close-out is in the stream: make sure a drainer follows it.
            await self._redis.sadd(CAMPAIGNS_SET, campaign_id)
        await self._announce("ended", f"{campaign_id} {closed.ends_at_ms}")

    async def _announce(self, kind: str, argument: str) -> None:
        """Tell every worker. Redis has decided already: a failure here only delays what
        the others show (they read it again when they resubscribe) and is logged."""
        try:
            if self._events is not None:
                await self._events.publish(kind, argument)
            else:
                await publish(self._redis, kind, argument)
        except RedisError as exc:
            log.warning("could not announce %s %s: %r", kind, argument, exc)

    async def close(self) -> None:
        """Stop re-reads in flight (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
