"""The campaigns a bench runs against, created through the operator API."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from redis.asyncio import Redis

from bench.openresty import unlist
from bench.stack import ADMIN_TOKEN


@dataclass
class Campaigns:
    """Campaign ids by path; the per-round lists hold one fresh campaign per round."""

    grab: list[str]
    always: list[str]
    lottery: list[str]
    sold: str
    ended: str
    early: str
    # The OpenResty comparison's, one per round, not followed by the drainers.
    openresty: list[str]


async def create(http: aiohttp.ClientSession, base: str, **fields: object) -> str:
    """Create a campaign (a red packet unless ``kind`` says otherwise); return its id."""
    body = {"kind": "red_packet", "name": "bench", **fields}
    async with http.post(
        f"{base}/api/admin/campaigns",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as resp:
        data = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"create failed: {data}")
        return str(data["id"])


async def create_lottery(http: aiohttp.ClientSession, base: str) -> str:
    """A lottery every bench player may draw from once, with ample stock."""
    return await create(
        http,
        base,
        kind="lottery",
        name="bench 财神",
        tiers=[
            {"name": "8.88元", "stock": 1_000_000, "weight": 10, "value_fen": 888},
            {"name": "福袋", "stock": 1_000_000, "weight": 30, "value_fen": None},
        ],
        no_prize_weight=60,
        quota_total=1,
    )


async def closed_windows(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    """Two one-envelope campaigns whose window is closed: one ended, one not yet started."""
    ended = await create(
        http,
        base,
        total_fen=100,
        count=1,
        starts_at="2001-01-01T00:00:00Z",
        ends_at="2001-01-02T00:00:00Z",
    )
    early = await create(http, base, total_fen=100, count=1, starts_at="2999-01-01T00:00:00Z")
    return ended, early


async def sell_out(http: aiohttp.ClientSession, base: str, campaign_id: str, token: str) -> None:
    """Grab the one envelope of ``campaign_id`` as the player of ``token``."""
    async with http.post(
        f"{base}/api/campaigns/{campaign_id}/grab",
        cookies={"hb_session": token},
        headers={"Origin": base, "X-Requested-With": "hongbao"},
    ) as resp:
        body = await resp.json()
        if body.get("result") != "won":
            raise RuntimeError(f"the sold-out campaign's one grab answered {body}")


async def create_all(
    base: str, redis: Redis, rounds: int, players: int, seller_token: str
) -> Campaigns:
    """Every campaign of every path; the sold-out one is sold out by ``seller_token``."""
    async with aiohttp.ClientSession() as http:
        # A fresh campaign per round, so every request of a grab run is a first grab.
        big = {"total_fen": players * 100, "count": players}
        grab = [await create(http, base, **big) for _ in range(rounds)]
        always = [await create(http, base, **big) for _ in range(rounds)]
        openresty = [await create(http, base, name="openresty", **big) for _ in range(rounds)]
        for campaign_id in openresty:
            await unlist(redis, campaign_id)
        sold = await create(http, base, total_fen=100, count=1)
        ended, early = await closed_windows(http, base)
        # One lottery per round: quota_total 1, so every draw of a run is a first one.
        lottery = [await create_lottery(http, base) for _ in range(rounds)]
        await sell_out(http, base, sold, seller_token)
    return Campaigns(
        grab=grab,
        always=always,
        lottery=lottery,
        sold=sold,
        ended=ended,
        early=early,
        openresty=openresty,
    )
