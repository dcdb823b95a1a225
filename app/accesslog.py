"""The JSON access log: one line per request, written in batches.

A line is serialised when the request ends and queued; the queue is written with one
``write`` at the next turn of the event loop, so a busy worker makes one system call
for many requests instead of one each (a per-line ``logging`` handler write cost
about a third of a worker's throughput on the closed-window path).
"""

from __future__ import annotations

import asyncio
import sys
from typing import IO, Any

import orjson


class AccessLog:
    """Queues JSON lines and writes them to ``stream`` (default: stdout) once per loop turn."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self._scheduled = False

    def emit(self, line: dict[str, Any]) -> None:
        """Queue one access line."""
        self._pending.append(orjson.dumps(line))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued (also called at shutdown)."""
        self._scheduled = False
        if not self._pending:
            return
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        stream.write(b"\n".join(self._pending) + b"\n")
        stream.flush()
        self._pending.clear()
