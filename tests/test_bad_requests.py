"""Bad input gets the right 4xx JSON error, never a 500, and changes nothing."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.identity.sessions import Session, issue
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN, create_campaign, login

VALID = {"kind": "red_packet", "name": "红包", "total_fen": 1000, "count": 10}


def _with(**changes: Any) -> dict[str, Any]:
    body = dict(VALID)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()

# (description, body or raw bytes, status, error, field)
CREATE_CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("malformed json", b'{"kind": "red_packet",', 400, "invalid_json", None),
    ("not an object", b"[1, 2, 3]", 400, "invalid_json", None),
    ("empty body", b"", 400, "invalid_json", None),
    ("missing kind", _with(kind=_DROP), 422, "invalid", "kind"),
    ("unknown kind", _with(kind="coupon"), 422, "invalid", "kind"),
    ("unknown field", _with(bonus=1), 422, "invalid", "bonus"),
    ("name missing", _with(name=_DROP), 422, "invalid", "name"),
    ("name blank", _with(name="   "), 422, "invalid", "name"),
    ("name not a string", _with(name=42), 422, "invalid", "name"),
    ("name too long", _with(name="红" * 101), 422, "invalid", "name"),
    ("total as string", _with(total_fen="1000"), 422, "invalid", "total_fen"),
    ("total as float", _with(total_fen=1000.0), 422, "invalid", "total_fen"),
    ("total as bool", _with(total_fen=True), 422, "invalid", "total_fen"),
    ("total zero", _with(total_fen=0), 422, "invalid", "total_fen"),
    ("total negative", _with(total_fen=-5), 422, "invalid", "total_fen"),
    ("total overflowing", _with(total_fen=10**30), 422, "invalid", "total_fen"),
    ("total over bound", _with(total_fen=100_000_000_001), 422, "invalid", "total_fen"),
    ("count missing", _with(count=_DROP), 422, "invalid", "count"),
    ("count zero", _with(count=0), 422, "invalid", "count"),
    ("count negative", _with(count=-1), 422, "invalid", "count"),
    ("count over bound", _with(count=10_000_001), 422, "invalid", "count"),
    ("count as list", _with(count=[10]), 422, "invalid", "count"),
    ("min zero", _with(min_fen=0), 422, "invalid", "min_fen"),
    ("total below count*min", _with(min_fen=101), 422, "invalid", "total_fen"),
    ("max below min", _with(min_fen=50, max_fen=40), 422, "invalid", "max_fen"),
    ("total above count*max", _with(max_fen=99), 422, "invalid", "total_fen"),
    ("max negative", _with(max_fen=-1), 422, "invalid", "max_fen"),
    ("starts not a time", _with(starts_at="tomorrow"), 422, "invalid", "starts_at"),
    ("starts without offset", _with(starts_at="2030-01-01T00:00:00"), 422, "invalid", "starts_at"),
    ("starts a number", _with(starts_at=1700000000), 422, "invalid", "starts_at"),
    (
        "ends before starts",
        _with(starts_at="2030-01-02T00:00:00Z", ends_at="2030-01-01T00:00:00Z"),
        422,
        "invalid",
        "ends_at",
    ),
    (
        "ends equal starts",
        _with(starts_at="2030-01-01T00:00:00Z", ends_at="2030-01-01T08:00:00+08:00"),
        422,
        "invalid",
        "ends_at",
    ),
    ("oversized body", _with(name="x" * 70_000), 413, "payload_too_large", None),
]


async def _snapshot(client: TestClient, redis: Redis, pg: asyncpg.Connection, cid: str) -> Any:
    stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    keys = CampaignKeys.of(cid)
    return (
        stats,
        await redis.lrange(keys.pool, 0, -1),
        await redis.hgetall(keys.winners),
        await pg.fetchval("SELECT count(*) FROM campaigns"),
        await pg.fetchval("SELECT count(*) FROM envelopes"),
    )


@pytest.mark.parametrize(
    ("body", "status", "error", "field"),
    [case[1:] for case in CREATE_CASES],
    ids=[case[0] for case in CREATE_CASES],
)
async def test_bad_campaign_definitions(
    client: TestClient,
    redis: Redis,
    pg: asyncpg.Connection,
    body: Any,
    status: int,
    error: str,
    field: str | None,
) -> None:
    existing = await create_campaign(client, total_fen=500, count=5)
    before = await _snapshot(client, redis, pg, str(existing["id"]))

    if isinstance(body, bytes):
        resp = await client.post("/api/admin/campaigns", data=body, headers=ADMIN)
    else:
        resp = await client.post("/api/admin/campaigns", json=body, headers=ADMIN)
    assert resp.status == status
    assert resp.content_type == "application/json"
    data = await resp.json()
    assert data["error"] == error
    assert isinstance(data["message"], str)
    assert data["message"]
    if field is not None:
        assert data["field"] == field

    assert await _snapshot(client, redis, pg, str(existing["id"])) == before
    assert await redis.scard("hb:campaigns") == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": "test-admin-token-0123456789"},
        {"Authorization": "Bearer test-admin-token-012345678"},
        {"Authorization": "Basic dGVzdDp0ZXN0"},
    ],
    ids=["missing", "wrong", "no scheme", "prefix", "basic"],
)
async def test_admin_token_required(
    client: TestClient, redis: Redis, headers: dict[str, str]
) -> None:
    existing = await create_campaign(client, total_fen=500, count=5)
    resp = await client.post("/api/admin/campaigns", json=VALID, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthenticated"
    resp = await client.get(f"/api/admin/campaigns/{existing['id']}", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthenticated"
    assert await redis.scard("hb:campaigns") == 1


@pytest.mark.parametrize(
    "cookie",
    [
        None,
        "",
        "garbage",
        "x" * 43,
        issue(b"not the key".ljust(32), Session("victim"), 2**40)[1],
        "a" * 5000,
        "{tag}" + "a" * 38,
        "a.b.c.d.e",
        "\u00e9" * 30,
    ],
    ids=[
        "none",
        "empty",
        "short",
        "unknown-shape",
        "forged",
        "huge",
        "braces",
        "dotted",
        "non-ascii",
    ],
)
async def test_grab_without_valid_session(
    client: TestClient, redis: Redis, pg: asyncpg.Connection, cookie: str | None
) -> None:
    campaign = await create_campaign(client, total_fen=500, count=5)
    cid = str(campaign["id"])
    before = await _snapshot(client, redis, pg, cid)
    cookies = {} if cookie is None else {"hb_session": cookie}
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies=cookies)
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthenticated"
    resp = await client.get(f"/api/campaigns/{cid}/me", cookies=cookies)
    assert resp.status == 401
    assert await _snapshot(client, redis, pg, cid) == before


@pytest.mark.parametrize(
    "cid",
    ["0000000000000000", "nope", "%7Bx%7D", "a" * 65, "x}y", "%00", "abc%20def"],
)
async def test_unknown_campaign_ids(client: TestClient, redis: Redis, cid: str) -> None:
    await create_campaign(client, total_fen=500, count=5)
    await login(client, "wanderer")
    for method, path in [
        ("GET", f"/api/campaigns/{cid}"),
        ("POST", f"/api/campaigns/{cid}/grab"),
        ("GET", f"/api/campaigns/{cid}/me"),
        ("GET", f"/api/admin/campaigns/{cid}"),
    ]:
        resp = await client.request(method, path, headers=ADMIN)
        assert resp.status == 404, (method, path)
        assert (await resp.json())["error"] == "not_found"
    keys = await redis.keys("*")
    assert all(not k.startswith(b"hb:{nope") for k in keys)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"not json", 400, None),
        ({"openid": ""}, 422, "openid"),
        ({"openid": 12}, 422, "openid"),
        ({"openid": "has space"}, 422, "openid"),
        ({"openid": "o" * 65}, 422, "openid"),
        ({"openid": "ok", "admin": True}, 422, "admin"),
        ({}, 422, "openid"),
    ],
)
async def test_bad_dev_login(
    client: TestClient, redis: Redis, body: Any, status: int, field: str | None
) -> None:
    if isinstance(body, bytes):
        resp = await client.post("/auth/dev-login", data=body)
    else:
        resp = await client.post("/auth/dev-login", json=body)
    assert resp.status == status
    data = await resp.json()
    assert data["error"] == ("invalid_json" if status == 400 else "invalid")
    if field is not None:
        assert data["field"] == field
    assert "hb_session" not in resp.cookies
    assert await redis.keys("hb:sess:*") == []


async def test_unknown_route_and_method(client: TestClient) -> None:
    resp = await client.get("/api/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
    resp = await client.delete("/api/admin/campaigns")
    assert resp.status == 405
    data = await resp.json()
    assert data["error"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]
