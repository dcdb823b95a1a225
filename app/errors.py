"""API errors, rendered as JSON by the edge middleware (app.web.edge)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.compression_utils import MAX_SYNC_CHUNK_SIZE
from multidict import CIMultiDict


class ApiError(Exception):
    """An error the client caused or must react to; rendered as {"error", "message"}."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return {"error": self.code, "message": self.message, **self.extra}


class OperationError(Exception):
    """An operator command cannot run on this campaign; the message says why."""


class InvalidJson(ApiError):
    code = "invalid_json"


class Invalid(ApiError):
    """A field failed validation; ``field`` names it."""

    status = 422
    code = "invalid"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


class Unauthenticated(ApiError):
    status = 401
    code = "unauthenticated"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class NotStarted(ApiError):
    status = 409
    code = "not_started"


class Ended(ApiError):
    status = 409
    code = "ended"


class Paused(ApiError):
    """An operator paused the campaign: grabs and draws wait until it is resumed."""

    status = 409
    code = "paused"


class WrongKind(ApiError):
    """A grab on a lottery or a draw on a red packet."""

    status = 409
    code = "wrong_kind"


class QuotaExhausted(ApiError):
    """The player has used their draws; ``scope`` says which quota ("total" or "daily")."""

    status = 429
    code = "quota_exhausted"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"


_REASONS = {status.value: status.phrase for status in HTTPStatus}
_JSON_TYPE = {hdrs.CONTENT_TYPE: "application/json"}


class JsonResponse(web.Response):
    """``web.Response(body=body, status=status, content_type="application/json")``,
    made in a third of the instructions.

    Hand-written because it was measured to pay: aiohttp's general constructor (text or
    body, charset, headers given or not) cost ~12,300 instructions a response, this one
    ~4,200, and every request gets one (python -m bench.instructions: see
    docs/benchmarks.md). It sets what ``Response.__init__`` sets for a bytes body (the
    rest are class defaults); tests/test_hot_responses.py fails when aiohttp's own
    constructor leaves anything different.
    """

    _zlib_executor_size = MAX_SYNC_CHUNK_SIZE
    _zlib_executor = None

    def __init__(self, body: bytes, status: int = 200) -> None:
        self._state = {}
        self._headers = CIMultiDict(_JSON_TYPE)
        self._status = status
        self._reason = _REASONS.get(status, "")
        self._body = body


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON response serialised with orjson."""
    return JsonResponse(orjson.dumps(data), status)


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def http_error_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's HTTP error (404, 405, 413 ...) as a JSON error body."""
    code = _HTTP_CODES.get(exc.status, "http_error")
    response = json_response({"error": code, "message": exc.reason}, status=exc.status)
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response
