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
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from app.errors import json_response
from app.settings import Settings
from app.web.hot import HotRoutes, LowLevelHandler
from app.web.keys import READINESS

log = logging.getLogger("hongbao.lifecycle")

# What aiohttp answers itself, outside every middleware: unparsable requests (bad
# request line, oversized or undecodable headers, bad chunking), handler timeouts and
# failures while a response is written.
_PROTOCOL_ERRORS = {
    400: ("bad_request", "malformed HTTP request"),
    413: ("payload_too_large", "request too large"),
    431: ("headers_too_large", "request headers too large"),
    500: ("internal", "internal error"),
    504: ("timeout", "the request took too long"),
}


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, its own error answers in the API's JSON shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer ``{"error", "message"}`` and close the connection.

        Logged without aiohttp's message, which quotes the offending request line or
        header: a query string there may be an OAuth code.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("response already sent, cannot send the error")
        if status >= 500:
            log.error("protocol error %s: %s", status, type(exc).__name__, exc_info=exc)
        else:
            log.info("refused a malformed request (%s): %s", status, type(exc).__name__)
        code, text = _PROTOCOL_ERRORS.get(status, ("http_error", "request failed"))
        response = json_response({"error": code, "message": text}, status=status)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    """An aiohttp server whose connections are ``_JsonErrorHandler``s."""

    def __init__(self, made: web.Server, handler: LowLevelHandler, **kwargs: Any) -> None:
        super().__init__(
            handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **kwargs,
        )
        self._handler_kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class JsonErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose server answers protocol-level errors in JSON and the hot
    routes below the Application (app.web.hot)."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _JsonErrorServer(made, HotRoutes(self.app, made.request_handler), access_log=None)


async def run_worker(app: web.Application, settings: Settings) -> int:
    """Serve ``app`` on ``settings.host:port`` until signalled; return the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = JsonErrorRunner(
        app,
        handle_signals=False,
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
