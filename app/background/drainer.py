"""Write-behind drainers: copy every campaign's ledger stream into PostgreSQL.

The settlement scripts XADD one entry per settled event to ``hb:{<cid>}:ledger`` in the
same atomic step that grants it. Drainers read those streams through one consumer
group (``GROUP``), record each batch in one PostgreSQL round trip, and only after the
COMMIT acknowledge and delete the entries (XACK + XDEL in one MULTI). So:

* the stream holds exactly the entries not yet committed to PostgreSQL: its XLEN is
  the ledger lag, and it never grows beyond that;
* a drainer that dies between reading and acknowledging leaves its entries pending;
  another drainer claims them once idle for ``claim_idle_ms`` (XAUTOCLAIM) and writes
  them again, which the idempotent insert turns into a no-op for rows already there;
* while PostgreSQL is unreachable the drainer retries with exponential back-off and
  acknowledges nothing; grabs never wait on it.

Drainers (and the lag sampler) follow the campaigns in ``hb:campaigns``; a drainer
closes out a campaign that has ended by Redis's clock (close_campaign.lua, once: its
leftovers become one last entry of its stream), and removes it once it is closed out
and its stream is empty. No entry can follow then (the scripts refuse after the end,
and close out only once), so background work is proportional to live campaigns, not to
history; PostgreSQL still knows every campaign for reconcile and rebuild, and a rebuild
lists the campaign again.

On a Redis Cluster each campaign's stream lives in its own slot, and a cluster refuses
one XREADGROUP over streams of several slots. There a read is one XREADGROUP per stream
(not blocking), pipelined: redis-py sends each shard its streams' reads in one round
trip, all shards at once; when no stream had anything, the drainer waits
``CLUSTER_POLL_S`` before reading again. Claims (XAUTOCLAIM) were per stream already;
the acknowledgement is one MULTI per stream.

Entries carry their kind in field ``k`` (absent: a grab); the ledger (app.store.ledger)
decodes and records each by its kind, and keeps an entry it cannot decode in
``ledger_rejects`` rather than lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any, cast

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from app.metrics import Metrics
from app.records import LedgerEntry
from app.settings import LedgerSettings
from app.store import ledger
from app.store.client import cluster_of, open_redis
from app.store.ledger import Written
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys, Scripts, pool_owner

log = logging.getLogger("hongbao.drainer")

GROUP = "drainers"
# How often the list of campaigns (hence streams) is re-read.
REFRESH_S = 2.0
# Errors that no retry can fix: the batch is written entry by entry to isolate the culprit.
PERMANENT_ERRORS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)
FIRST_RETRY_S = 0.05
# On a Redis Cluster (no blocking read across slots): the wait after a read found nothing.
CLUSTER_POLL_S = 0.1


def consumer_name() -> str:
    """This process's consumer name in the group: hostname-pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _group_lost(exc: ResponseError) -> bool:
    """The stream (hence its group) is gone: NOGROUP, or UNBLOCKED while we were blocked."""
    return str(exc).startswith(("NOGROUP", "UNBLOCKED"))


class Drainer:
    """One consumer of the ledger streams of every campaign in ``hb:campaigns``."""

    def __init__(
        self,
        redis: Redis,
        pg: asyncpg.Pool,
        settings: LedgerSettings,
        consumer: str,
        metrics: Metrics | None = None,
    ) -> None:
        self._redis = redis
        self._scripts = Scripts(redis)
        self._cluster = cluster_of(redis) is not None
        self._metrics = metrics
        self._pg = pg
        self._settings = settings
        self.consumer = consumer
        self._stopping = asyncio.Event()
        # stream key -> (campaign id, shard), for streams whose consumer group is known
        # to exist (a sharded red packet's sub-pools: one stream each)
        self._streams: dict[str, tuple[str, int]] = {}
        self._refreshed_at = float("-inf")
        self._claimed_at = float("-inf")
        # The blocking XREADGROUP in progress, if any: stop() cancels it.
        self._read: asyncio.Future[Any] | None = None
        self.written = Written()

    def stop(self) -> None:
        """Ask the loop to finish its current batch and return (at once if it is idle)."""
        self._stopping.set()
        if self._read is not None and not self._read.done():
            self._read.cancel()

    async def run(self) -> None:
        """Drain until stopped; Redis or PostgreSQL errors mean back off and retry."""
        delay = FIRST_RETRY_S
        log.info("drainer %s started", self.consumer)
        while not self._stopping.is_set():
            try:
                done = await self.step()
                delay = FIRST_RETRY_S
                if 0 < done < self._settings.batch_max and self._settings.linger_ms:
                    # Let the next batch fill up (see LedgerSettings.linger_ms).
                    await self._pause(self._settings.linger_ms / 1000)
            except Exception as exc:
                if isinstance(exc, RedisError) and self._metrics is not None:
                    self._metrics.count_redis_error()
                log.warning("drainer %s: %s; retrying in %.2fs", self.consumer, _err(exc), delay)
                await self._pause(delay)
                delay = min(delay * 2, self._settings.retry_max_ms / 1000)
        log.info("drainer %s stopped (%s)", self.consumer, self.written)

    async def step(self) -> int:
        """Claim abandoned entries when due, then read and record one batch; return entries."""
        now = time.monotonic()
        if now - self._refreshed_at >= REFRESH_S or not self._streams:
            try:
                await self._refresh()
            except RedisError as exc:
                # A shard that does not answer (a master stalled or lost) must not stop
                # the draining of the streams already followed on the others.
                if not (self._cluster and self._streams) or isinstance(exc, ResponseError):
                    raise
                log.warning("drainer %s: campaigns not refreshed: %s", self.consumer, _err(exc))
            self._refreshed_at = now
        if not self._streams:
            await self._pause(self._settings.block_ms / 1000)
            return 0
        done = 0
        if now - self._claimed_at >= self._settings.claim_idle_ms / 2000:
            done += await self._claim()
            self._claimed_at = now
        if self._stopping.is_set():
            return done
        self._read = asyncio.ensure_future(self._read_new())
        try:
            reply = await self._read
        except asyncio.CancelledError:
            if not (self._stopping.is_set() and self._read.cancelled()):
                raise
            # stop() cut the idle wait short; anything delivered meanwhile stays pending.
            return done
        except ResponseError as exc:
            if not _group_lost(exc):
                raise
            # A stream was deleted (and its group with it): create the groups again.
            self._streams.clear()
            return done
        read = [
            (stream, self._entry(stream, raw_id, fields))
            for key, items in reply or []
            for stream in (key.decode(),)
            for raw_id, fields in items
            if fields is not None
        ]
        if read:
            await self._process(read)
        return done + len(read)

    def _entry(self, stream: str, raw_id: bytes, fields: dict[bytes, bytes]) -> LedgerEntry:
        campaign_id, shard = self._streams[stream]
        return LedgerEntry.of(campaign_id, raw_id, fields, shard)

    async def _read_new(self) -> Any:
        """XREADGROUP new entries of every stream, blocking up to block_ms.

        The command is built here, inside the read task, not by its creator: redis-py's
        ``xreadgroup`` returns a wrapper coroutine over the ``execute_command`` coroutine it
        has already created, so a read task cancelled by stop() before its first step
        would close the wrapper and leave the inner coroutine never awaited (a
        RuntimeWarning at garbage collection). Built here, a task cancelled that early
        has created nothing, and one that has started cancels the command it awaits.
        """
        if self._cluster:
            return await self._read_slot_by_slot()
        return await self._redis.xreadgroup(
            GROUP,
            self.consumer,
            dict.fromkeys(self._streams, ">"),
            count=self._settings.batch_max,
            block=self._settings.block_ms,
        )

    async def _read_slot_by_slot(self) -> list[Any]:
        """A cluster's read: every stream's XREADGROUP, pipelined by shard; waits
        CLUSTER_POLL_S when nothing came.

        A shard that fails (a master lost, until its replica is promoted) does not stop
        the others: what they delivered is recorded now, not left pending until claimed.
        Only when nothing came is a failure raised (the caller backs off); a lost group
        is raised first, so that the groups are created again.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in self._streams:
                pipe.xreadgroup(GROUP, self.consumer, {key: ">"}, count=self._settings.batch_max)
            replies = await pipe.execute(raise_on_error=False)
        errors = [r for r in replies if isinstance(r, Exception)]
        for error in errors:
            if isinstance(error, ResponseError) and _group_lost(error):
                raise error
        reply = [
            stream
            for streams in replies
            if not isinstance(streams, Exception)
            for stream in streams or []
        ]
        if not any(items for _, items in reply):
            if errors:
                raise errors[0]
            await self._pause(min(CLUSTER_POLL_S, self._settings.block_ms / 1000))
        elif errors:
            log.warning(
                "drainer %s: %d stream(s) unread (%s); the others recorded",
                self.consumer,
                len(errors),
                _err(errors[0]),
            )
        return reply

    async def _refresh(self) -> None:
        """Pick up new campaigns: create their consumer group (from the stream's start);
        close out ended ones; let go of closed-out, drained ones."""
        members = cast(set[bytes], await self._redis.smembers(CAMPAIGNS_SET))
        ids = await self._prune(sorted(m.decode() for m in members))
        new = {CampaignKeys.of(pool).ledger: pool_owner(pool) for pool in ids}
        missing = [key for key in new if key not in self._streams]
        if missing:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in missing:
                    pipe.xgroup_create(key, GROUP, id="0", mkstream=True)
                results = await pipe.execute(raise_on_error=False)
            for result in results:
                if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                    raise result
        self._streams = new

    async def _prune(self, ids: list[str]) -> list[str]:
        """Close out the campaigns ended by Redis's clock that are not closed out yet;
        remove from ``hb:campaigns`` those closed out whose stream is empty; return the
        others. A campaign without meta (loading) stays.

        Closing out is idempotent (close_campaign.lua): drainers racing here write one
        close-out between them, and it is drained like any entry before the campaign is
        let go.
        """
        if not ids:
            return ids
        # Redis's clock first (a cluster pipeline refuses TIME): what ended by then ended.
        seconds, micros = await self._redis.time()
        now = seconds * 1000 + micros // 1000
        async with self._redis.pipeline(transaction=False) as pipe:
            for cid in ids:
                keys = CampaignKeys.of(cid)
                pipe.hmget(keys.meta, "ends_at_ms", "closed_ms")
                pipe.xlen(keys.ledger)
            reply = await pipe.execute()
        done = []
        for cid, (ends, closed), lag in zip(ids, reply[0::2], reply[1::2], strict=True):
            if ends is None or now < int(ends):
                continue
            if closed is None:
                await self._scripts.close_campaign(cid, end_now=False)
            elif int(lag) == 0:
                done.append(cid)
        if not done:
            return ids
        await self._redis.srem(CAMPAIGNS_SET, *done)
        log.info(
            "drainer %s: %d ended campaign(s) fully drained, no longer followed",
            self.consumer,
            len(done),
        )
        finished = set(done)
        return [cid for cid in ids if cid not in finished]

    async def _claim(self) -> int:
        """Take over entries pending with other consumers for longer than claim_idle_ms."""
        claimed = 0
        for key in list(self._streams):
            start = "0-0"
            # Bounded: each round claims up to batch_max entries or moves the cursor on.
            for _ in range(1000):
                try:
                    reply = await self._redis.xautoclaim(
                        key,
                        GROUP,
                        self.consumer,
                        self._settings.claim_idle_ms,
                        start_id=start,
                        count=self._settings.batch_max,
                    )
                except ResponseError as exc:
                    if not _group_lost(exc):
                        raise
                    self._streams.clear()
                    return claimed
                except RedisError as exc:
                    if not self._cluster:
                        raise
                    # That stream's shard does not answer: claim on the others.
                    log.warning("drainer %s: %s not claimed: %s", self.consumer, key, _err(exc))
                    break
                entries = [
                    (key, self._entry(key, raw_id, fields))
                    for raw_id, fields in reply[1]
                    if fields is not None
                ]
                if entries:
                    log.info(
                        "drainer %s claimed %d entries of %s", self.consumer, len(entries), key
                    )
                    if not await self._process(entries):
                        return claimed
                    claimed += len(entries)
                start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                if start == "0-0":
                    break
        return claimed

    async def _process(self, read: list[tuple[str, LedgerEntry]]) -> bool:
        """Record then acknowledge ``read`` (stream key, entry); False if stopped before
        PostgreSQL took the batch."""
        if not await self._record([entry for _, entry in read]):
            return False
        by_stream: dict[str, list[str]] = {}
        for stream, entry in read:
            by_stream.setdefault(stream, []).append(entry.stream_id)
        # XACK and XDEL together: the stream then holds exactly the unrecorded entries.
        if self._cluster:
            # A MULTI stays within one slot there: one per stream, all at once.
            await asyncio.gather(*(self._ack({key: ids}) for key, ids in by_stream.items()))
        else:
            await self._ack(by_stream)
        return True

    async def _ack(self, by_stream: dict[str, list[str]]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for key, ids in by_stream.items():
                pipe.xack(key, GROUP, *ids)
                pipe.xdel(key, *ids)
            await pipe.execute()

    async def _record(self, entries: list[LedgerEntry]) -> bool:
        """Write ``entries`` to PostgreSQL, retrying until it works or we are stopped."""
        delay = FIRST_RETRY_S
        while True:
            try:
                try:
                    self.written += await self._write(entries)
                except PERMANENT_ERRORS as exc:
                    log.error(
                        "drainer %s: batch refused (%s); writing one by one",
                        self.consumer,
                        _err(exc),
                    )
                    for entry in entries:
                        self.written += await self._write_alone(entry)
                return True
            except Exception as exc:
                if self._stopping.is_set():
                    log.warning(
                        "drainer %s: stopping with %d entries unrecorded (pending)",
                        self.consumer,
                        len(entries),
                    )
                    return False
                log.warning(
                    "drainer %s: ledger write failed (%s); retry in %.2fs",
                    self.consumer,
                    _err(exc),
                    delay,
                )
                await self._pause(delay)
                delay = min(delay * 2, self._settings.retry_max_ms / 1000)

    async def _write(self, entries: list[LedgerEntry]) -> Written:
        return await ledger.record(self._pg, entries)

    async def _write_alone(self, entry: LedgerEntry) -> Written:
        try:
            return await ledger.record(self._pg, [entry])
        except PERMANENT_ERRORS as exc:
            return await ledger.reject(self._pg, entry, f"refused by PostgreSQL: {exc}")

    async def _pause(self, seconds: float) -> None:
        """Sleep, waking early when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


async def drain_process(
    redis_url: str, database_url: str, settings: LedgerSettings, cluster: bool = False
) -> None:
    """``python -m app drain``: one drainer in its own process, until SIGTERM or SIGINT;
    ``cluster``: ``redis_url`` is a node of a Redis Cluster."""
    if settings.drain_nice:
        os.nice(settings.drain_nice)
    redis = open_redis(redis_url, cluster=cluster)
    # min_size=0: start (and keep running) even while PostgreSQL is down.
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2)
    drainer = Drainer(redis, pool, settings, consumer_name())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, drainer.stop)
    try:
        await drainer.run()
    finally:
        await pool.close()
        await redis.aclose()
