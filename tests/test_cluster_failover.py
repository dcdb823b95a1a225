"""A master of the Redis Cluster SIGKILLed: what players were told against what is kept.

The module's cluster has 3 masters with 2 replicas each (a master that fails over still
has a replica to WAIT for) and a node timeout of 1 s. With REDIS_WAIT_REPLICAS=1 a grab
is answered only once a replica has it, so a failover loses no grant a player was told
about. Without it replication is asynchronous: a grant the master answered and had not
yet sent to its replicas dies with it; reconcile lists it (PostgreSQL has it, Redis does
not) and rebuild restores the campaign from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from app.campaigns import operations
from app.identity.sessions import SessionStore
from app.local.cluster import EmbeddedCluster
from app.settings import LedgerSettings, Settings
from app.store.scripts import CampaignKeys
from app.web.factory import create_app
from tests.cluster_support import (  # noqa: F401 - fixtures
    NODE_TIMEOUT_MS,
    as_cluster,
    cluster_clean_fixture,
    cluster_redis_fixture,
    cluster_settings_fixture,
)
from tests.conftest import ADMIN, PAGE, create_campaign, login, worker_env
from tests.test_topology import Topology, haproxy_binary

FAST = LedgerSettings(block_ms=50, claim_idle_ms=200, retry_max_ms=200)
# A failover takes the node timeout, an election and the new map reaching the workers.
RESUME_WITHIN_S = 8.0


@pytest.fixture(name="cluster", scope="module")
def two_replica_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """3 masters with 2 replicas each, of this module's own."""
    server = EmbeddedCluster(
        Path(tmp_path_factory.mktemp("cluster")),
        masters=3,
        replicas=2,
        node_timeout_ms=NODE_TIMEOUT_MS,
    ).start()
    yield server
    server.stop()


def _slot(cluster: EmbeddedCluster, cid: str) -> int:
    from redis.crc import key_slot

    return key_slot(CampaignKeys.of(cid).pool.encode())


def _promoted(cluster: EmbeddedCluster, slot: int, old: int, within_s: float = 15) -> int:
    """Wait until a master other than ``old`` serves ``slot``; its port."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            port = cluster.master_of(slot).port
        except LookupError:
            port = old
        if port != old:
            return port
        time.sleep(0.05)
    raise AssertionError(f"no replica took slot {slot} over within {within_s}s")


# Workers on the cluster that answer a grant only once a replica has it.
WAIT_ONE = {
    "REDIS_CLUSTER": "1",
    "REDIS_WAIT_REPLICAS": "1",
    "REDIS_TIMEOUT_MS": "1000",
    "LEDGER_BLOCK_MS": "50",
    "LEDGER_CLAIM_IDLE_MS": "500",
}


@dataclass
class ClusterTopology(Topology):
    """HAProxy in front of worker processes on the cluster."""

    extra: dict[str, str] = field(default_factory=dict)

    def start_worker(self, name: str) -> None:
        """A worker process with the cluster settings on top of the test ones."""
        import subprocess
        import sys

        from app.local.embedded import free_port

        port = free_port()
        env = worker_env(self.redis_url, self.database_url, port, **self.extra)
        out = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "app", "worker"], env=env, stdout=out, stderr=out
        )
        out.close()
        self.worker_ports[name] = port

    def start_all(self) -> None:
        """Two workers behind HAProxy, all answering."""
        self.start_worker("w1")
        self.start_worker("w2")
        self.start_edge()
        self.wait_all_up()

    def wait_all_up(self, timeout: float = 60) -> None:
        """As Topology's, once HAProxy's admin socket exists (it may lag its port)."""
        deadline = time.monotonic() + 10
        while self.socket_path is None or not self.socket_path.exists():
            assert time.monotonic() < deadline, "HAProxy's admin socket never appeared"
            time.sleep(0.05)
        super().wait_all_up(timeout)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client without a cookie jar: every request names its session."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=64),
        headers=PAGE,
    ) as session:
        yield session


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed")
async def test_sigkill_a_master_under_load_with_wait_loses_no_acknowledged_grant(
    tmp_path: Path,
    cluster: EmbeddedCluster,
    cluster_redis: Redis,
    database_url: str,
    http: aiohttp.ClientSession,
) -> None:
    topology = ClusterTopology(tmp_path, cluster.url, database_url, extra=WAIT_ONE)
    try:
        topology.start_all()
        url = topology.url
        body = {"kind": "red_packet", "name": "failover", "total_fen": 500_000, "count": 5000}
        async with http.post(f"{url}/api/admin/campaigns", json=body, headers=ADMIN) as resp:
            assert resp.status == 201, await resp.text()
            cid = str((await resp.json())["id"])
        players = [f"f{i:05d}" for i in range(2500)]
        tokens = await SessionStore(cluster_redis, 3600).mint(players)
        slot = _slot(cluster, cid)
        victim = cluster.master_of(slot).port

        told: dict[str, tuple[str, int]] = {}
        answered_at: list[float] = []
        killed_at: list[float] = []
        deadline = time.monotonic() + 45

        async def grab(player: str, token: str) -> None:
            # A player retries a 503 (a failover in progress) until it gets an answer.
            while True:
                assert time.monotonic() < deadline, "a player never got an answer"
                async with http.post(
                    f"{url}/api/campaigns/{cid}/grab", headers={"Cookie": f"hb_session={token}"}
                ) as resp:
                    if resp.status == 200:
                        answer = await resp.json()
                        told[player] = (answer["result"], answer["amount_fen"])
                        answered_at.append(time.monotonic())
                        return
                    assert resp.status in (503, 429), await resp.text()
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
        promoted = _promoted(cluster, slot, victim)
        assert promoted != victim
        resumed = min(t for t in answered_at if t > killed_at[0]) - killed_at[0]
        assert resumed < RESUME_WITHIN_S, f"grabs resumed {resumed:.1f}s after the kill"

        # Every grant a player was told about is in Redis, with the amount told.
        winners = {
            u.decode(): int(v.split(b":")[1])
            for u, v in (await cluster_redis.hgetall(CampaignKeys.of(cid).winners)).items()
        }
        won = {p: amount for p, (result, amount) in told.items() if result != "sold_out"}
        assert len(won) == len(players)
        assert winners == won
        cluster.restart(victim)
        cluster.wait_ok()
        stream = CampaignKeys.of(cid).ledger
        drain_deadline = time.monotonic() + 30
        while await cluster_redis.xlen(stream):
            assert time.monotonic() < drain_deadline, "the ledger did not drain"
            await asyncio.sleep(0.1)
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            report = await operations.reconcile(cluster_redis, pool, cid)
        finally:
            await pool.close()
        assert report.ok, report.render()
    finally:
        topology.stop()


async def _node(port: int) -> Redis:
    return Redis(host="127.0.0.1", port=port)


async def grab_retrying(client: Any, cid: str, token: str) -> tuple[str, int]:
    """A grab as a player makes it, retrying a 503 (the first call to a failed master
    makes the worker read the new slot map); its result and amount."""
    for _ in range(20):
        resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
        if resp.status != 503:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    return answer["result"], answer["amount_fen"]


async def cut_replication(replicas: list[Any]) -> None:
    """Cut ``replicas`` off their master (they cannot re-authenticate) and wait until
    each has lost its link: the master's writes from now on are its alone."""
    for replica in replicas:
        node = await _node(replica.port)
        await node.config_set("masterauth", "not-the-password")
        await node.client_kill_filter(_type="master")
        await node.aclose()
    for replica in replicas:
        node = await _node(replica.port)
        deadline = time.monotonic() + 5
        while (await node.info("replication")).get("master_link_status") == "up":
            assert time.monotonic() < deadline, "the replica kept its link"
            await asyncio.sleep(0.05)
        await node.aclose()


async def restore_replication(replicas: list[Any]) -> None:
    """Let ``replicas`` authenticate to a master again (after cut_replication)."""
    for replica in replicas:
        node = await _node(replica.port)
        await node.config_set("masterauth", "")
        await node.aclose()


async def test_without_wait_a_failover_can_lose_a_grant_reconcile_lists_it_rebuild_restores(
    aiohttp_client: Any,
    cluster: EmbeddedCluster,
    cluster_settings: Settings,
    cluster_redis: Redis,
    database_url: str,
) -> None:
    """Replication cut (the replicas cannot re-authenticate), grants answered by the
    master alone, drained into PostgreSQL, then the master dies: the promoted replica
    never had them."""
    client = await aiohttp_client(create_app(cluster_settings.with_(ledger=FAST)), headers=PAGE)
    cid = str((await create_campaign(client, total_fen=10_000, count=100))["id"])
    tokens = {f"l{i:02d}": await login(client, f"l{i:02d}") for i in range(20)}
    client.session.cookie_jar.clear()

    async def grab(player: str) -> tuple[str, int]:
        return await grab_retrying(client, cid, tokens[player])

    async def drained() -> None:
        deadline = time.monotonic() + 20
        while await cluster_redis.xlen(CampaignKeys.of(cid).ledger):
            assert time.monotonic() < deadline, "the ledger did not drain"
            await asyncio.sleep(0.05)

    before = [f"l{i:02d}" for i in range(10)]
    lost = [f"l{i:02d}" for i in range(10, 20)]
    kept = {p: await grab(p) for p in before}
    await drained()
    slot = _slot(cluster, cid)
    master = cluster.master_of(slot)
    replicas = cluster.replicas_of(master)
    await cut_replication(replicas)
    told = {p: await grab(p) for p in lost}
    assert all(result == "won" for result, _ in told.values())
    await drained()  # PostgreSQL has them; only the master had them in Redis
    cluster.kill(master.port)
    await restore_replication(replicas)
    _promoted(cluster, slot, master.port)
    cluster.wait_ok()

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        report = await operations.reconcile(cluster_redis, pool, cid)
        assert not report.ok
        for player in lost:
            assert any(
                f"player {player}: recorded in PostgreSQL" in m for m in report.mismatches
            ), report.render()
        for player in before:
            assert not any(f"player {player}:" in m for m in report.mismatches)

        # The documented repair: close the campaign in Redis (its meta), let the drainers
        # finish, rebuild from PostgreSQL.
        await cluster_redis.delete(CampaignKeys.of(cid).meta)
        await drained()
        result = await operations.rebuild(cluster_redis, pool, cid)
        assert result.winners.count == 20
        report = await operations.reconcile(cluster_redis, pool, cid)
        assert report.ok, report.render()
    finally:
        await pool.close()
    for player, (_, amount) in {**kept, **told}.items():
        assert await grab(player) == ("already_won", amount)
    cluster.restart(master.port)
    cluster.wait_ok()


async def test_a_grant_fewer_replicas_acknowledged_is_not_answered(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis
) -> None:
    """REDIS_WAIT_REPLICAS beyond the replicas a master has: the grant settles but the
    player gets 503; asked again where the replicas suffice, it answers already_won."""
    strict = await aiohttp_client(
        create_app(cluster_settings.with_(redis_wait_replicas=3, redis_timeout_ms=1200)),
        headers=PAGE,
    )
    enough = await aiohttp_client(
        create_app(cluster_settings.with_(redis_wait_replicas=2)), headers=PAGE
    )
    cid = str((await create_campaign(strict, total_fen=1_000, count=10))["id"])
    token = await login(strict, "careful")
    strict.session.cookie_jar.clear()
    resp = await strict.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    assert resp.status == 503, await resp.text()
    raw = await cluster_redis.hget(CampaignKeys.of(cid).winners, "careful")
    assert raw is not None
    resp = await enough.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    assert resp.status == 200
    assert await resp.json() == {"result": "already_won", "amount_fen": int(raw.split(b":")[1])}
