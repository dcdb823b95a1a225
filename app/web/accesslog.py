"""The JSON access log: one line per request, written in batches.

The edge middleware builds each line: ``ts`` (unix seconds), ``level`` (INFO, ERROR for
a 5xx), ``pid``, ``request_id``, ``route``, ``method``, ``status``, ``duration_ms`` and
``user``; the first three are those of the application log lines (app.logs), so one log
store query covers both. Every request gets a line (health checks and scrapes only when
they fail), except the answers that settle nothing at the peak: of the grabs answered
sold out or already won, one in ACCESS_LOG_SAMPLE (default 100) is logged, carrying
``sample`` (the N it stands for). Every error, every settlement (a won grab, a draw)
and every other route is logged in full, and HAProxy logs every request with its id.

A line is serialised when the request ends and queued; the queue is written with one
``write`` FLUSH_AFTER_S after its first line (or as soon as it holds FLUSH_LINES), so a
busy worker makes one system call for hundreds of requests instead of one each (a
per-line ``logging`` handler write cost about a third of a worker's throughput on the
closed-window path, a write per event-loop turn still about a tenth). A worker killed
outright loses at most that window of log lines; the ledger, not this log, is the
record of money.
"""

from __future__ import annotations

import asyncio
import sys
from typing import IO, Any

import orjson

from app.errors import JsonResponse

FLUSH_AFTER_S = 0.05
FLUSH_LINES = 1024


class RoutineResponse(JsonResponse):
    """A 200 that settled nothing (a grab answered sold out or already won): one in
    ACCESS_LOG_SAMPLE of these gets an access line, with ``sample`` (how many it stands
    for); HAProxy's log has a line for each, with its request id."""


def routine_json(data: Any) -> RoutineResponse:
    """A JSON RoutineResponse (200), serialised with orjson."""
    return RoutineResponse(orjson.dumps(data))


class AccessLog:
    """Queues JSON lines and writes them to ``stream`` (default: stdout) in batches."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self._scheduled = False

    def emit(self, line: dict[str, Any]) -> None:
        """Queue one access line."""
        self._pending.append(orjson.dumps(line))
        if len(self._pending) >= FLUSH_LINES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self._flush_later)

    def _flush_later(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write everything queued (also called at shutdown)."""
        if not self._pending:
            return
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        stream.write(b"\n".join(self._pending) + b"\n")
        stream.flush()
        self._pending.clear()
