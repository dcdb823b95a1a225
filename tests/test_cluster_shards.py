"""Sharded red packets on a real Redis Cluster (3 masters, 3 replicas, this module's own).

A campaign of K sub-pools puts them on different masters (one each for K = 3, one or two
each for K = 5), players whose home sub-pool ran dry win from the others until the whole
campaign is sold out, and the invariants are the unsharded ones: nobody wins twice
across sub-pools, count and sum exact, PostgreSQL's ledger is the union of the
sub-pools' winners. (The 2,000 players' test on K = 1 and K = 5 is test_cluster's.)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.crc import key_slot

from app.local.cluster import EmbeddedCluster
from app.records import Envelope
from app.redpacket import routing
from app.settings import Settings
from app.store.scripts import CampaignKeys, spread_pools
from tests.cluster_support import (  # noqa: F401 - fixtures
    cluster_app,
    cluster_clean_fixture,
    cluster_fixture,
    cluster_redis_fixture,
    cluster_settings_fixture,
    ledger_equals_sub_pools,
    reconciled,
    winners_by_pool,
)
from tests.conftest import ADMIN, create_campaign, gather_limited, login


def _master_port(cluster: EmbeddedCluster, pool_id: str) -> int:
    return cluster.master_of(key_slot(CampaignKeys.of(pool_id).meta.encode())).port


@pytest.mark.parametrize("shards", [3, 5])
async def test_sub_pools_spread_over_the_masters(
    aiohttp_client: Any,
    cluster: EmbeddedCluster,
    cluster_settings: Settings,
    cluster_redis: Redis,
    shards: int,
) -> None:
    """K sub-pools on 3 masters: on every master (one each for K = 3); each sub-pool's
    keys in one slot, its meta naming its budget, the envelopes dealt seq % K."""
    client = await cluster_app(aiohttp_client, cluster_settings)
    cid = str((await create_campaign(client, total_fen=50_000, count=50, shards=shards))["id"])
    pools = spread_pools(cid, shards)
    meta = await cluster_redis.hgetall(CampaignKeys.of(cid).meta)
    assert meta[b"pools"].decode().split(",") == list(pools)
    homes = Counter(_master_port(cluster, pool_id) for pool_id in pools)
    assert set(homes) == {n.port for n in cluster.topology() if n.master and n.slots}
    if shards == 3:
        assert sorted(homes.values()) == [1, 1, 1]
    total_count = total_fen = 0
    for shard, pool_id in enumerate(pools):
        keys = CampaignKeys.of(pool_id)
        assert len({key_slot(k.encode()) for k in (keys.meta, keys.pool, keys.winners)}) == 1
        envelopes = [Envelope.decode(v) for v in await cluster_redis.lrange(keys.pool, 0, -1)]
        assert {e.seq % shards for e in envelopes} == {shard}
        sub = await cluster_redis.hgetall(keys.meta)
        assert (sub[b"kind"], sub[b"campaign"], int(sub[b"shard"])) == (
            b"shard",
            cid.encode(),
            shard,
        )
        assert int(sub[b"count"]) == len(envelopes)
        assert int(sub[b"total_fen"]) == sum(e.amount_fen for e in envelopes)
        total_count += len(envelopes)
        total_fen += sum(e.amount_fen for e in envelopes)
    assert (total_count, total_fen) == (50, 50_000)


# "spread5" is an id whose sub-pools 1 and 3 (their slot ranges straddle a master's
# edge) both landed on the middle master when a sub-pool took the first salt anywhere in
# its range; placed at the centres of the ranges, they no longer can.
@pytest.mark.parametrize("cid", ["spread0", "spread5"])
def test_five_sub_pools_put_one_or_two_on_each_of_3_masters(
    cluster: EmbeddedCluster, cid: str
) -> None:
    """spread_pools' promise, K / M to a master within one, on the real slot map."""
    homes = Counter(_master_port(cluster, pool_id) for pool_id in spread_pools(cid, 5))
    assert sorted(homes.values()) == [1, 2, 2], homes


async def _grab(client: TestClient, token: str, cid: str) -> tuple[str, int]:
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200, body
    return body["result"], body.get("amount_fen", 0)


async def test_players_whose_home_ran_dry_win_from_the_other_sub_pools(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis, database_url: str
) -> None:
    """K = 3, 10 envelopes a sub-pool, every player homed on sub-pool 0: the first 10
    empty it, the next 20 fall through to sub-pools 1 and 2 and win there (each where
    its route first finds an envelope), then the campaign is sold out to everyone;
    count and sum exact, PostgreSQL == the union of the sub-pools' winners."""
    a = await cluster_app(aiohttp_client, cluster_settings)
    b = await cluster_app(aiohttp_client, cluster_settings)
    cid = str((await create_campaign(a, total_fen=30_000, count=30, shards=3))["id"])
    pools = spread_pools(cid, 3)
    homed = [
        p for p in (f"t{i:04d}" for i in range(400)) if next(routing.order(pools, p)) == pools[0]
    ]
    assert len(homed) >= 40
    tokens = {p: await login(a, p) for p in homed[:40]}
    a.session.cookie_jar.clear()
    first, tail, late = homed[:10], homed[10:30], homed[30:40]

    told = dict(
        zip(first, await gather_limited([_grab(a, tokens[p], cid) for p in first]), strict=True)
    )
    assert {result for result, _ in told.values()} == {"won"}
    assert await cluster_redis.llen(CampaignKeys.of(pools[0]).pool) == 0
    winners = await winners_by_pool(cluster_redis, pools)
    assert {p: shard for p, (shard, _) in winners.items()} == dict.fromkeys(first, 0)

    # One at a time, so each lands where its route first finds an envelope.
    left = {pools[1]: 10, pools[2]: 10}
    for i, player in enumerate(tail):
        told[player] = await _grab((a, b)[i % 2], tokens[player], cid)
        assert told[player][0] == "won", told[player]
        expected = next(pool_id for pool_id in routing.order(pools, player) if left.get(pool_id))
        left[expected] -= 1
        shard, envelope = (await winners_by_pool(cluster_redis, pools))[player]
        assert (pools[shard], envelope.amount_fen) == (expected, told[player][1])
    for pool_id in pools:
        assert await cluster_redis.llen(CampaignKeys.of(pool_id).pool) == 0

    # Sold out everywhere: a newcomer is told so by both workers, a winner is told the
    # amount won, wherever it was won.
    retries = [(p, w) for p in late + first[:3] + tail[:3] for w in (a, b)]
    answers = await gather_limited([_grab(w, tokens[p], cid) for p, w in retries])
    for (player, _), answer in zip(retries, answers, strict=True):
        if player in late:
            assert answer == ("sold_out", 0)
        else:
            assert answer == ("already_won", told[player][1])

    in_redis = await ledger_equals_sub_pools(cluster_redis, database_url, cid, pools)
    assert {p: e.amount_fen for p, (_, e) in in_redis.items()} == {
        p: amount for p, (_, amount) in told.items()
    }
    assert Counter(shard for shard, _ in in_redis.values()) == {0: 10, 1: 10, 2: 10}
    await reconciled(cluster_redis, database_url, cid)
    assert sum(amount for _, amount in told.values()) == 30_000
    stats = await (await a.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert (stats["won_count"], stats["won_fen"], stats["remaining_count"]) == (30, 30_000, 0)
    assert stats["state"] == "sold_out"
    assert [s["won_count"] for s in stats["per_shard"]] == [10, 10, 10]
