"""Health as the balancer and the operator see it: readiness, the ledger, the event loop.

Readiness means "can serve grabs": not draining, Redis answers (the pool and the script
line) and the Lua scripts are loaded. PostgreSQL is never part of it: grabs do not touch
PostgreSQL and the drainers wait for it, so an outage only grows the ledger lag. Its
health is reported on its own (``GET /healthz/ledger`` and ``hongbao_ledger_up``).
"""

from __future__ import annotations

import asyncio

import asyncpg

from app.metrics import Metrics

# A PostgreSQL probe that takes longer than this counts as down; one runs this often.
LEDGER_PROBE_TIMEOUT_S = 1.0
LEDGER_PROBE_EVERY_S = 2.0
# The loop probe's tick, and the delay past which a tick counts as a stall.
LOOP_TICK_S = 0.01
LOOP_STALL_S = 0.05
# hongbao_loop_stall_recent_max_seconds covers the current and the previous window.
LOOP_WINDOW_S = 5.0


class Readiness:
    """Flipped once, by the worker's SIGTERM handler; read by ``/readyz``."""

    def __init__(self) -> None:
        self.draining = False

    def start_draining(self) -> None:
        """From now on ``/readyz`` answers 503 so load balancers stop sending traffic."""
        self.draining = True


async def ledger_up(pg: asyncpg.Pool, metrics: Metrics) -> bool:
    """Whether PostgreSQL answers ``SELECT 1`` within the probe timeout (also the metric)."""
    try:
        async with asyncio.timeout(LEDGER_PROBE_TIMEOUT_S):
            await pg.fetchval("SELECT 1")
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        metrics.set_ledger_up(False)
        return False
    metrics.set_ledger_up(True)
    return True


class LoopWatch:
    """A callback every 10 ms that records how late it runs: how long the loop was blocked."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._window_end = 0.0
        self._current = 0.0
        self._previous = 0.0

    def start(self) -> None:
        """Start ticking on the running loop."""
        loop = asyncio.get_running_loop()
        self._due = loop.time() + LOOP_TICK_S
        self._window_end = loop.time() + LOOP_WINDOW_S
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        late = max(0.0, now - self._due)
        if now >= self._window_end:
            self._previous, self._current = self._current, 0.0
            self._window_end = now + LOOP_WINDOW_S
        if late > self._current:
            self._current = late
        if late > LOOP_STALL_S:
            self._metrics.count_loop_stall()
        self._metrics.set_loop_stall(max(self._current, self._previous))
        self._due = now + LOOP_TICK_S
        self._handle = loop.call_at(self._due, self._tick, loop)

    def stop(self) -> None:
        """Stop ticking (shutdown)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
