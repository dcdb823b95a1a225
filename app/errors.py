"""API errors, rendered as JSON by the edge middleware (app.web.edge)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


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


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


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
