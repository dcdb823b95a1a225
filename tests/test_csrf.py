"""CSRF: unsafe player requests need proof they come from our own page."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.settings import Settings
from app.store.scripts import CampaignKeys
from app.web.factory import create_app
from tests.conftest import ADMIN, PAGE, create_campaign


@pytest.fixture
async def bare(aiohttp_client, settings: Settings) -> TestClient:  # type: ignore[no-untyped-def]
    """A client sending no Origin, Referer or page header unless told to."""
    return await aiohttp_client(create_app(settings))


def own(client: TestClient) -> str:
    return f"http://{client.host}:{client.port}"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Referer": "https://evil.example/c/x"},
        {"Origin": "https://evil.example", **PAGE},
        {"X-Requested-With": "XMLHttpRequest"},
    ],
)
async def test_cross_site_grab_refused(
    bare: TestClient, redis: Redis, headers: dict[str, str]
) -> None:
    campaign = await create_campaign(bare, total_fen=300, count=3)
    cid = str(campaign["id"])
    resp = await bare.post("/auth/dev-login", json={"openid": "victim"}, headers=PAGE)
    assert resp.status == 200
    resp = await bare.post(f"/api/campaigns/{cid}/grab", headers=headers)
    assert resp.status == 403
    assert (await resp.json())["error"] == "csrf"
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 0
    assert await redis.llen(CampaignKeys.of(cid).pool) == 3


@pytest.mark.parametrize("how", ["origin", "referer", "header"])
async def test_same_origin_grab_allowed(bare: TestClient, redis: Redis, how: str) -> None:
    campaign = await create_campaign(bare, total_fen=300, count=3)
    cid = str(campaign["id"])
    await bare.post("/auth/dev-login", json={"openid": "player"}, headers=PAGE)
    headers = {
        "origin": {"Origin": own(bare)},
        "referer": {"Referer": f"{own(bare)}/c/{cid}"},
        "header": PAGE,
    }[how]
    resp = await bare.post(f"/api/campaigns/{cid}/grab", headers=headers)
    assert resp.status == 200
    assert (await resp.json())["result"] == "won"
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 1


async def test_public_base_url_is_the_origin(aiohttp_client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(
        create_app(settings.with_(public_base_url="https://hb.example.com"))
    )
    campaign = await create_campaign(client, total_fen=100, count=1)
    ok = await client.post(
        "/auth/dev-login", json={"openid": "p"}, headers={"Origin": "https://hb.example.com"}
    )
    assert ok.status == 200
    # The Host the request happened to use is not our public origin.
    resp = await client.post(
        f"/api/campaigns/{campaign['id']}/grab", headers={"Origin": own(client)}
    )
    assert resp.status == 403


async def test_logout_and_login_need_same_origin(bare: TestClient) -> None:
    assert (await bare.post("/auth/dev-login", json={"openid": "x"})).status == 403
    assert (await bare.post("/auth/logout")).status == 403
    assert (await bare.post("/auth/logout", headers=PAGE)).status == 200


async def test_admin_and_unknown_routes_exempt(bare: TestClient) -> None:
    resp = await bare.post(
        "/api/admin/campaigns",
        json={"kind": "red_packet", "name": "x", "total_fen": 1, "count": 1},
        headers=ADMIN,
    )
    assert resp.status == 201
    resp = await bare.post("/no/such/route")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
    resp = await bare.get("/api/campaigns/nope")
    assert resp.status == 404
