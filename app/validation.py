"""Parsing request bodies into typed values, with errors that name the field."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from app.errors import Invalid, InvalidJson
from app.model import from_datetime


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 invalid_json error."""
    body = await request.read()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJson("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidJson("request body must be a JSON object")
    return data


def reject_unknown(data: Mapping[str, Any], allowed: set[str]) -> None:
    """422 on the first field not in ``allowed``."""
    for name in data:
        if name not in allowed:
            raise Invalid(name, f"unknown field {name!r}")


def get_optional_int(
    data: Mapping[str, Any], name: str, *, minimum: int, maximum: int
) -> int | None:
    """An integer field within ``[minimum, maximum]``, or None when absent or null.

    Booleans and floats are rejected: JSON ``true`` or ``1.0`` is not a count of fen.
    """
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(name, f"{name} must be an integer")
    if not minimum <= value <= maximum:
        raise Invalid(name, f"{name} must be between {minimum} and {maximum}")
    return value


def get_int(
    data: Mapping[str, Any], name: str, *, minimum: int, maximum: int, default: int | None = None
) -> int:
    """A required integer field within ``[minimum, maximum]`` (``default`` when absent)."""
    value = get_optional_int(data, name, minimum=minimum, maximum=maximum)
    if value is not None:
        return value
    if default is None:
        raise Invalid(name, f"{name} is required")
    return default


def get_str(data: Mapping[str, Any], name: str, *, max_len: int) -> str:
    """A required non-blank string field of at most ``max_len`` characters."""
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise Invalid(name, f"{name} must be a non-empty string")
    if len(value) > max_len:
        raise Invalid(name, f"{name} must be at most {max_len} characters")
    return value.strip()


def get_time_ms(data: Mapping[str, Any], name: str) -> int | None:
    """An optional RFC 3339 timestamp with an offset, as unix milliseconds."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(name, f"{name} must be an RFC 3339 timestamp string or null")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(name, f"{name} is not an RFC 3339 timestamp") from None
    if moment.tzinfo is None:
        raise Invalid(name, f"{name} must carry a UTC offset (e.g. Z or +08:00)")
    return from_datetime(moment)
