"""Request bodies decoded into msgspec structs, with errors that name the field.

The structs are the one statement of what a body may hold: msgspec validates against
them, and the OpenAPI document (app.web.openapi) publishes their JSON Schema. What a
schema cannot say (sums, orders, one field against another) is checked in code after
the decode, raising ``Invalid`` with the same kind of field path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
import orjson
from aiohttp import web

from app.errors import Invalid, InvalidJson
from app.model import FAR_FUTURE_MS, from_datetime

T = TypeVar("T")

# Text shown to people: at least one visible character, no control characters (NUL
# cannot be stored in PostgreSQL; the rest have no place in a name).
VISIBLE_TEXT = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"

# An RFC 3339 timestamp that carries its UTC offset.
Timestamp = Annotated[
    datetime, msgspec.Meta(tz=True, description="RFC 3339 with an offset (Z or +08:00)")
]

# Every time is kept as unix milliseconds and shown back in UTC: it must stay within
# years 1-9999 once converted (9999-12-31T23:59:59+00:00 is the last one).
MIN_TIME_MS = from_datetime(datetime(1, 1, 1, tzinfo=UTC))
MAX_TIME_MS = FAR_FUTURE_MS

_NAMED = re.compile(r"^Object (?P<how>missing required|contains unknown) field `(?P<name>.*)`$")
# msgspec's wording of a few common failures, said plainly ("Expected `int` >= 1").
_BOUND = re.compile(r"^Expected `[^`]+` (?P<op>>=|<=|>|<) (?P<n>\S+)$")
_LENGTH = re.compile(r"^Expected `(?P<type>str|array|object)` of length (?P<op>>=|<=) (?P<n>\d+)$")
_TYPE = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_OPS = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}
_ITEMS = {"str": "characters", "array": "items", "object": "fields"}
_JSON_TYPES = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
    "datetime": "an RFC 3339 time",
}


def _plain(what: str) -> str:
    """msgspec's description of a failure, in the words of a JSON body."""
    if bound := _BOUND.match(what):
        return f"must be {_OPS[bound['op']]} {bound['n']}"
    if length := _LENGTH.match(what):
        most = "at least" if length["op"] == ">=" else "at most"
        items = _ITEMS[length["type"]]
        return f"must have {most} {length['n']} {items[:-1] if length['n'] == '1' else items}"
    if wrong := _TYPE.match(what):
        want = " or ".join(_JSON_TYPES.get(t, t) for t in wrong["want"].split(" | "))
        return f"must be {want}, not {_JSON_TYPES.get(wrong['got'], wrong['got'])}"
    if named := _NAMED.match(what):
        return "is required" if named["how"] == "missing required" else "is not a known field"
    return what


def _invalid(exc: msgspec.ValidationError) -> Invalid:
    """msgspec's error as a 422 naming the field in full (``tiers[0].schedule[2].at``)."""
    message = str(exc)
    # msgspec ends the message with where it failed: " - at `$.tiers[0].stock`".
    head, at, tail = message.rpartition(" - at `$")
    what, path = (head, tail.removesuffix("`").removeprefix(".")) if at else (message, "")
    named = _NAMED.match(what)
    if named is not None:
        path = f"{path}.{named['name']}" if path else named["name"]
    if "matching regex" in what:
        what = "has characters not allowed here (see its pattern in /api/openapi.json)"
    field = path or "body"
    return Invalid(field, f"{field}: {_plain(what)}")


def convert(data: Mapping[str, Any], kind: type[T]) -> T:
    """``data`` (as JSON would carry it) validated into ``kind``; 422 naming the field."""
    try:
        return msgspec.convert(msgspec.to_builtins(data), kind)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


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


def time_ms(moment: datetime, field: str) -> int:
    """Unix milliseconds of a decoded timestamp; 422 outside years 1-9999 in UTC."""
    ms = from_datetime(moment)
    if not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        raise Invalid(field, f"{field} must fall within years 1-9999 in UTC")
    return ms


def optional_time_ms(moment: datetime | None, field: str) -> int | None:
    """``time_ms``, passing None (no time) through."""
    return None if moment is None else time_ms(moment, field)


def read_query(request: web.Request, kind: type[T]) -> T:
    """The query string validated into ``kind`` (strings converted: ``limit=50`` is an
    int); a repeated or unknown parameter is 422, as is a bad value (an empty one too)."""
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name in values:
            raise Invalid(name, f"{name} is given more than once")
        values[name] = value
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
