"""Coherence between workers over one Redis pub/sub channel.

Some answers a worker gives from its own memory, without asking Redis: a session token
whose signature checks is not revoked, a campaign it knows to be sold out has no
envelope left, a campaign it knows to be paused or ended takes no grab. Whatever
changes such a fact is published on ``hb:events`` as ``"<kind> <argument>"`` (``revoke
<sid> <expires>``, ``sold_out <campaign>``, ``reset <campaign>``, ``paused <campaign>``,
``resumed <campaign>``, ``ended <campaign> <ms>``) and every worker listens.

Pub/sub delivers only to those subscribed at the time, so a worker that (re)subscribes
first resynchronises from Redis (each consumer's ``on_resync``), and only then counts
as ``live``. While it is not live its consumers do not trust their memory and ask
Redis, as they would without this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.metrics import Metrics
from app.store.scripts import EVENTS_CHANNEL

log = logging.getLogger("hongbao.events")

# A pub/sub connection is quiet for long stretches: every this many seconds of silence
# the listener pings, so a connection that died without a word is noticed.
PING_EVERY_S = 5.0
RETRY_S = 0.5
RETRY_MAX_S = 8.0

Handler = Callable[[str], None]
Resync = Callable[[], Awaitable[None]]


async def publish(redis: Redis, kind: str, argument: str) -> None:
    """Tell every listening worker that ``kind`` happened to ``argument``."""
    await redis.publish(EVENTS_CHANNEL, f"{kind} {argument}")


class Events:
    """One worker's listener: dispatches messages by kind, resyncs on (re)subscribe."""

    def __init__(self, redis: Redis, metrics: Metrics | None = None) -> None:
        self._redis = redis
        self._metrics = metrics
        self._handlers: dict[str, list[Handler]] = {}
        self._resyncs: list[Resync] = []
        self._live = False
        # Whether the last subscription got as far as a resync (resets the back-off).
        self._resynced = False

    @property
    def live(self) -> bool:
        """Subscribed and resynced: memory kept up to date by events can be trusted."""
        return self._live

    def _set_live(self, live: bool) -> None:
        self._live = live
        if self._metrics is not None:
            self._metrics.set_events_live(live)

    def on(self, kind: str, handler: Handler) -> None:
        """Call ``handler(argument)`` for every ``kind`` message (after those already
        registered for it)."""
        self._handlers.setdefault(kind, []).append(handler)

    def on_resync(self, resync: Resync) -> None:
        """Call ``resync()`` on every (re)subscription, before the worker counts as live."""
        self._resyncs.append(resync)

    async def publish(self, kind: str, argument: str) -> None:
        """Publish, and apply the message here at once (not only when it comes back)."""
        self._dispatch(f"{kind} {argument}")
        await publish(self._redis, kind, argument)

    def _dispatch(self, message: str) -> None:
        kind, _, argument = message.partition(" ")
        handlers = self._handlers.get(kind)
        if not handlers:
            log.warning("unknown event %r", message)
            return
        for handler in handlers:
            try:
                handler(argument)
            except ValueError:
                log.warning("malformed event %r", message)

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set; reconnect and resync after any failure."""
        delay = RETRY_S
        while not stop.is_set():
            try:
                await self._listen(stop)
            except (RedisError, OSError) as exc:
                log.warning("event listener lost Redis (%r); resubscribing in %.1fs", exc, delay)
            finally:
                self._set_live(False)
            if self._resynced:
                delay = RETRY_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _listen(self, stop: asyncio.Event) -> None:
        self._resynced = False
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(EVENTS_CHANNEL)
            silent_s = 0.0
            while not stop.is_set():
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    silent_s += 1.0
                    if silent_s >= PING_EVERY_S:
                        await pubsub.ping()
                        silent_s = 0.0
                    continue
                silent_s = 0.0
                if message["type"] == "subscribe":
                    # Subscribed first, then resynced: nothing published in between is lost.
                    self._set_live(False)
                    for resync in self._resyncs:
                        await resync()
                    self._set_live(True)
                    self._resynced = True
                elif message["type"] == "message":
                    self._dispatch(message["data"].decode())
