"""The documented repair of one sub-pool of a sharded red packet after a failover lost
grants, on a real Redis Cluster (3 masters, 1 replica each).

K = 3 puts one sub-pool per master. Replication of one master is cut, grants of its
sub-pool are answered by it alone and drained into PostgreSQL, then it dies: the promoted
replica never had them. reconcile lists exactly those players under that shard; the
repair (delete the sub-pool's meta, let the drainers finish, rebuild) restores that
sub-pool alone from PostgreSQL, after which reconcile is OK and every player, on any
sub-pool, is answered already_won with the amount told.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.crc import key_slot

from app.campaigns import operations
from app.local.cluster import EmbeddedCluster
from app.redpacket import routing
from app.settings import Settings
from app.store.scripts import CampaignKeys
from tests.cluster_support import (  # noqa: F401 - fixtures
    cluster_app,
    cluster_clean_fixture,
    cluster_fixture,
    cluster_redis_fixture,
    cluster_settings_fixture,
    drained_pools,
)
from tests.conftest import create_campaign, login
from tests.test_cluster_failover import (
    _promoted,
    cut_replication,
    grab_retrying,
    restore_replication,
)

SHARDS = 3


async def test_a_sub_pool_that_lost_grants_in_a_failover_is_listed_then_rebuilt_alone(
    aiohttp_client: Any,
    cluster: EmbeddedCluster,
    cluster_settings: Settings,
    cluster_redis: Redis,
    database_url: str,
) -> None:
    client = await cluster_app(aiohttp_client, cluster_settings)
    cid = str((await create_campaign(client, total_fen=6_000, count=60, shards=SHARDS))["id"])
    pg = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        pools = (await operations.definition(pg, cid)).spec.pools
        victim = 1
        homed: dict[int, list[str]] = {k: [] for k in range(SHARDS)}
        for i in range(200):
            player = f"h{i:03d}"
            homed[pools.index(next(routing.order(pools, player)))].append(player)
        before = homed[0][:3] + homed[1][:3] + homed[2][:3]
        lost = homed[victim][3:8]
        tokens = {p: await login(client, p) for p in before + lost}
        client.session.cookie_jar.clear()

        async def grab(player: str) -> tuple[str, int]:
            return await grab_retrying(client, cid, tokens[player])

        kept = {p: await grab(p) for p in before}
        await drained_pools(cluster_redis, pools)
        slot = key_slot(CampaignKeys.of(pools[victim]).meta.encode())
        master = cluster.master_of(slot)
        # The other sub-pools live on other masters: only the victim's is at stake.
        assert all(
            cluster.master_of(key_slot(CampaignKeys.of(p).meta.encode())) != master
            for k, p in enumerate(pools)
            if k != victim
        )
        replicas = cluster.replicas_of(master)
        await cut_replication(replicas)
        told = {p: await grab(p) for p in lost}
        assert all(result == "won" for result, _ in told.values())
        await drained_pools(cluster_redis, pools)  # PostgreSQL has them, only the master did
        cluster.kill(master.port)
        await restore_replication(replicas)
        _promoted(cluster, slot, master.port)
        cluster.wait_ok()

        report = await operations.reconcile(cluster_redis, pg, cid)
        assert not report.ok
        for player in lost:
            line = f"shard {victim}: player {player}: recorded in PostgreSQL"
            assert any(m.startswith(line) for m in report.mismatches), report.render()
        for player in before:
            assert not any(f"player {player}:" in m for m in report.mismatches)

        await cluster_redis.delete(CampaignKeys.of(pools[victim]).meta)
        await drained_pools(cluster_redis, pools)
        result = await operations.rebuild(cluster_redis, pg, cid)
        assert (result.shards, result.meta) == ((victim,), False)
        assert result.winners.count == 3 + len(lost)
        report = await operations.reconcile(cluster_redis, pg, cid)
        assert report.ok, report.render()
    finally:
        await pg.close()
    for player, (_, amount) in {**kept, **told}.items():
        assert await grab(player) == ("already_won", amount)
    cluster.restart(master.port)
    cluster.wait_ok()
