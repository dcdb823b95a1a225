"""One worker's life: serve until SIGTERM/SIGINT, then drain and exit within the bound.

The shutdown sequence, all within ``SHUTDOWN_TIMEOUT_S`` of the signal:

1. ``/readyz`` answers 503 while the worker keeps serving every request it gets, for
   ``DRAIN_DELAY_S``: the load balancer's health checks take it out of rotation.
2. The listening socket closes; idle keep-alive connections close; requests in flight
   finish (given at most half of the time left).
3. Cleanup contexts run in reverse: batchers drain, background work registered as a
   cleanup context (the ledger drainer) flushes, pools close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from aiohttp import web

from app.settings import Settings
from app.web.keys import READINESS

log = logging.getLogger("hongbao.lifecycle")


async def run_worker(app: web.Application, settings: Settings) -> int:
    """Serve ``app`` on ``settings.host:port`` until signalled; return the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        # Requests in flight get at most half of what remains after the drain delay;
        # the other half is for the cleanup contexts (batchers, ledger flush).
        shutdown_timeout=(settings.shutdown_timeout_s - settings.drain_delay_s) / 2,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True)
        await site.start()
        # Everything made at start-up lives as long as the worker: out of the collector's
        # generations, it is not traversed again by every full collection.
        gc.freeze()
        log.info("worker ready on %s:%s", settings.host, settings.port)
        await stop.wait()
    except BaseException:
        await runner.cleanup()
        raise
    deadline = loop.time() + settings.shutdown_timeout_s
    app[READINESS].start_draining()
    log.info("draining: readiness off for %.1fs, still serving", settings.drain_delay_s)
    await asyncio.sleep(settings.drain_delay_s)
    log.info("stopping: no new connections, finishing requests in flight")
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=deadline - loop.time())
    except TimeoutError:
        log.error("shutdown exceeded SHUTDOWN_TIMEOUT_S=%s", settings.shutdown_timeout_s)
        return 1
    log.info("stopped cleanly")
    return 0
