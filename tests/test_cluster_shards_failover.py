"""The master of one sub-pool of a sharded red packet SIGKILLed under load.

test_cluster_failover's cluster (3 masters with 2 replicas each, node timeout 1 s) and
topology (HAProxy in front of two worker processes on it), with REDIS_WAIT_REPLICAS=1:
a K = 3 campaign has one sub-pool per master; killing one master stalls the players
homed there (503, retried) until its replica is promoted, while the other two keep
settling; no grant a player was told about is lost, nobody wins in two sub-pools, and
PostgreSQL ends up with exactly the sub-pools' winners.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from app.identity.sessions import SessionStore
from app.local.cluster import EmbeddedCluster
from app.records import Envelope
from app.redpacket import routing
from app.settings import Settings
from app.store.scripts import CampaignKeys, spread_pools
from tests.cluster_support import (  # noqa: F401 - fixtures
    cluster_app,
    cluster_clean_fixture,
    cluster_redis_fixture,
    cluster_settings_fixture,
    ledger_equals_sub_pools,
    reconciled,
    winners_by_pool,
)
from tests.conftest import ADMIN, create_campaign, login
from tests.test_cluster_failover import (  # noqa: F401 - fixtures
    RESUME_WITHIN_S,
    WAIT_ONE,
    ClusterTopology,
    _promoted,
    http,
    two_replica_cluster,
)
from tests.test_topology import haproxy_binary

SHARDS = 3


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed")
async def test_sigkill_the_master_of_a_sub_pool_under_load_loses_no_acknowledged_grant(
    tmp_path: Path,
    cluster: EmbeddedCluster,
    cluster_redis: Redis,
    database_url: str,
    http: aiohttp.ClientSession,  # noqa: F811 - the imported fixture
) -> None:
    topology = ClusterTopology(tmp_path, cluster.url, database_url, extra=WAIT_ONE)
    try:
        topology.start_all()
        url = topology.url
        body = {
            "kind": "red_packet",
            "name": "failover",
            "total_fen": 300_000,
            "count": 3000,
            "shards": SHARDS,
        }
        async with http.post(f"{url}/api/admin/campaigns", json=body, headers=ADMIN) as resp:
            assert resp.status == 201, await resp.text()
            cid = str((await resp.json())["id"])
        pools = spread_pools(cid, SHARDS)
        slots = [key_slot(CampaignKeys.of(p).meta.encode()) for p in pools]
        masters = [cluster.master_of(slot).port for slot in slots]
        assert len(set(masters)) == SHARDS, masters
        # The victim holds sub-pool 1; its players' grabs start there.
        victim, slot = masters[1], slots[1]
        players = [f"f{i:05d}" for i in range(2500)]
        homed = {p for p in players if next(routing.order(pools, p)) == pools[1]}
        tokens = await SessionStore(cluster_redis, 3600).mint(players)

        told: dict[str, tuple[str, int]] = {}
        answered_at: dict[str, float] = {}
        stalled: set[str] = set()
        killed_at: list[float] = []
        deadline = time.monotonic() + 60

        async def grab(player: str, token: str) -> None:
            # A player retries a 503 (a failover in progress) until it gets an answer.
            while True:
                assert time.monotonic() < deadline, f"{player} never got an answer"
                async with http.post(
                    f"{url}/api/campaigns/{cid}/grab", headers={"Cookie": f"hb_session={token}"}
                ) as resp:
                    if resp.status == 200:
                        answer = await resp.json()
                        told[player] = (answer["result"], answer["amount_fen"])
                        answered_at[player] = time.monotonic()
                        return
                    assert resp.status in (503, 429), await resp.text()
                    if resp.status == 503:
                        stalled.add(player)
                await asyncio.sleep(0.2)

        async def kill_when_under_way() -> None:
            while len(told) < 500:
                await asyncio.sleep(0.01)
            cluster.kill(victim)
            killed_at.append(time.monotonic())

        queue = iter(zip(players, tokens, strict=True))

        async def player_loop() -> None:
            for player, token in queue:
                await grab(player, token)

        killer = asyncio.create_task(kill_when_under_way())
        await asyncio.gather(*(player_loop() for _ in range(40)))
        await killer
        assert _promoted(cluster, slot, victim) != victim
        # Players homed on the killed master's sub-pool were stalled (and only a third
        # of the others: their sessions on it), then got answers again, soon.
        assert stalled & homed, "no grab met the killed master"
        after = [answered_at[p] - killed_at[0] for p in homed if answered_at[p] > killed_at[0]]
        assert after, "no player homed on the killed sub-pool was answered after the kill"
        assert min(after) < RESUME_WITHIN_S, f"its grabs resumed {min(after):.1f}s after"

        # Every grant a player was told about is a winner of exactly one sub-pool, with
        # the amount told; 3,000 envelopes for 2,500 players: everyone won once.
        assert {result for result, _ in told.values()} <= {"won", "already_won"}
        winners = await winners_by_pool(cluster_redis, pools)
        assert {p: e.amount_fen for p, (_, e) in winners.items()} == {
            p: amount for p, (_, amount) in told.items()
        }
        assert len(winners) == len(players)
        cluster.restart(victim)
        cluster.wait_ok()
        in_ledger = await ledger_equals_sub_pools(cluster_redis, database_url, cid, pools)
        assert in_ledger == winners
        await reconciled(cluster_redis, database_url, cid)
        assert (
            sum(e.amount_fen for _, e in winners.values())
            + sum([await _left_fen(cluster_redis, p) for p in pools])
            == 300_000
        )
    finally:
        topology.stop()


async def _left_fen(redis: Redis, pool_id: str) -> int:
    values = await redis.lrange(CampaignKeys.of(pool_id).pool, 0, -1)
    return sum(Envelope.decode(v).amount_fen for v in values)


async def test_with_wait_a_grab_falls_through_only_once_a_replica_saw_the_pool_empty(
    aiohttp_client: Any,
    cluster: EmbeddedCluster,
    cluster_settings: Settings,
    cluster_redis: Redis,
) -> None:
    """Sub-pool 0's replicas stall (DEBUG SLEEP): the grant that empties it answers 503
    (its WAIT falls short) and stands on the master alone. Another worker's grab of a
    player homed there finds the pool empty; were that answer not a write WAITed in turn,
    the grab would fall through and win in sub-pool 1, and a failover now (the replica
    still holding sub-pool 0's envelope) would let the player win there too. It answers
    503 instead, and wins once when asked again. (The embedded Redis 6.2 WAITs for all
    the master did before any call; grab_envelope.lua writes on an empty pool so as not
    to rely on that: which commands advance a connection's WAIT offset is Redis's
    choice.)"""
    wait = cluster_settings.with_(redis_wait_replicas=1, redis_timeout_ms=1200)
    first, second = await cluster_app(aiohttp_client, wait), await cluster_app(aiohttp_client, wait)
    cid = str((await create_campaign(first, total_fen=400, count=4, shards=2))["id"])
    pools = tuple(
        (await cluster_redis.hget(CampaignKeys.of(cid).meta, "pools")).decode().split(",")
    )
    homed = [u for u in (f"h{i}" for i in range(400)) if next(routing.order(pools, u)) == pools[0]]
    early, last, late = homed[:3]
    tokens = {u: await login(first, u) for u in (early, last, late)}
    first.session.cookie_jar.clear()
    second.session.cookie_jar.clear()

    async def grab(client: Any, player: str) -> tuple[int, dict[str, Any]]:
        resp = await client.post(
            f"/api/campaigns/{cid}/grab", cookies={"hb_session": tokens[player]}
        )
        return resp.status, await resp.json()

    # The second worker's connection to sub-pool 0's master has written, and had it
    # replicated, before the replicas stall.
    assert (await grab(second, early))[1]["result"] == "won"
    master = cluster.master_of(key_slot(CampaignKeys.of(pools[0]).meta.encode()))
    nodes = [Redis(host="127.0.0.1", port=r.port) for r in cluster.replicas_of(master)]
    stalls = [asyncio.ensure_future(n.execute_command("DEBUG", "SLEEP", "2")) for n in nodes]
    await asyncio.sleep(0.1)
    assert (await grab(first, last))[0] == 503  # granted on the master, not confirmed
    status, body = await grab(second, late)
    assert status == 503, body
    assert not [p for p in pools if await cluster_redis.hexists(CampaignKeys.of(p).winners, late)]
    await asyncio.gather(*stalls)
    for node in nodes:
        await node.aclose()
    status, body = await grab(second, late)
    assert (status, body["result"]) == (200, "won")
    holding = [p for p in pools if await cluster_redis.hexists(CampaignKeys.of(p).winners, late)]
    assert holding == [pools[1]]
