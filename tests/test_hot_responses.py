"""The hand-made JSON responses (app.errors.JsonResponse) are what aiohttp's own
constructor makes: the same attributes, headers, status, reason and body."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from app.errors import JsonResponse, json_response
from app.web.accesslog import RoutineResponse, routine_json


def _same(ours: web.Response, theirs: web.Response) -> None:
    """Every attribute aiohttp's responses have (class defaults included) is equal."""
    names = {
        name
        for name in set(vars(ours)) | set(vars(theirs)) | set(dir(web.Response))
        if name.startswith("_") and not name.startswith("__") and name != "_abc_impl"
    }
    for name in sorted(names):
        mine, aiohttps = getattr(ours, name), getattr(theirs, name)
        if callable(aiohttps) and not isinstance(aiohttps, (bytes, dict)):
            continue
        if name == "_headers":
            mine, aiohttps = list(mine.items()), list(aiohttps.items())
        assert mine == aiohttps, name


@pytest.mark.parametrize("status", [200, 201, 400, 401, 403, 404, 409, 422, 429, 500, 503, 599])
def test_json_response_is_aiohttps(status: int) -> None:
    body = orjson.dumps({"error": "ended", "message": "活动已结束"})
    ours = JsonResponse(body, status)
    theirs = web.Response(body=body, status=status, content_type="application/json")
    assert set(vars(ours)) <= set(vars(theirs))
    _same(ours, theirs)
    assert (ours.status, ours.reason, ours.body, ours.content_type, ours.charset) == (
        theirs.status,
        theirs.reason,
        theirs.body,
        theirs.content_type,
        theirs.charset,
    )


def test_helpers_make_them() -> None:
    assert type(json_response({"a": 1}, status=409)) is JsonResponse
    routine = routine_json({"result": "sold_out"})
    assert isinstance(routine, RoutineResponse)
    _same(routine, web.Response(body=b'{"result":"sold_out"}', content_type="application/json"))
