"""Application logs as JSON lines, in the shape of the access log's lines.

Every record is one line on stderr with ``ts`` (unix seconds), ``level``, ``pid``,
``logger``, ``message`` and ``request_id`` (the request being handled, else null);
tracebacks go in ``exc_info`` within the same line. The formatter is python-json-logger
with orjson, the access log's encoder.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from types import TracebackType
from typing import TextIO

from pythonjsonlogger.orjson import OrjsonFormatter

# The id of the request being handled: set by the edge middleware for the request's
# duration. A ContextVar is module-level by design; each task sees its own value.
CURRENT_REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

FIELDS = ("created", "levelname", "process", "name", "message", "request_id")
RENAMED = {"created": "ts", "levelname": "level", "process": "pid", "name": "logger"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request's id (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add ``request_id``; never drops a record."""
        record.request_id = CURRENT_REQUEST_ID.get()
        return True


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    """A handler writing JSON lines to ``stream`` (default: stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(OrjsonFormatter(list(FIELDS), rename_fields=RENAMED))
    return handler


def configure(level: int = logging.INFO) -> None:
    """Route every log record, warning and uncaught exception of the process to JSON lines."""
    logging.basicConfig(level=level, handlers=[json_handler()], force=True)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("hongbao").critical("uncaught exception", exc_info=(kind, exc, tb))
