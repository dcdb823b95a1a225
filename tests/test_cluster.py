"""The whole service on a real Redis Cluster (3 masters, 3 replicas, started per module).

Grabs, draws, sessions and revocations, the events channel, the drainers and reconcile
run on the cluster through the app, and the invariants are the single Redis's: nobody
wins twice, count and sum exact, PostgreSQL's ledger equals Redis after the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.background.lag import ledger_lag_by_pool, ledger_lag_by_shard
from app.local.cluster import EmbeddedCluster
from app.local.embedded import free_port
from app.settings import LedgerSettings, Settings
from app.store.scriptline import ClusterLine
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys, GrabCode, Scripts, spread_pools
from app.web.factory import create_app
from tests.cluster_support import (  # noqa: F401 - fixtures
    as_cluster,
    cluster_app,
    cluster_clean_fixture,
    cluster_fixture,
    cluster_redis_fixture,
    cluster_settings_fixture,
    ledger_equals_sub_pools,
    reconciled,
)
from tests.conftest import ADMIN, PAGE, create_campaign, gather_limited, login, until_live
from tests.test_lottery_api import LOTTERY


async def _grab(client: TestClient, token: str, cid: str) -> dict[str, Any]:
    resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200, body
    return body


async def _drained(redis: Redis, cid: str, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while await redis.xlen(CampaignKeys.of(cid).ledger) > 0:
        assert time.monotonic() < deadline, "the ledger did not drain"
        await asyncio.sleep(0.05)


async def test_campaigns_spread_over_the_masters(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis
) -> None:
    """Each campaign's keys share one slot; different campaigns land on different masters."""
    client = await cluster_app(aiohttp_client, cluster_settings)
    ids = [str((await create_campaign(client, count=10))["id"]) for _ in range(12)]
    nodes = as_cluster(cluster_redis)
    homes = {nodes.get_node_from_key(CampaignKeys.of(cid).pool).name for cid in ids}
    assert len(homes) > 1
    for cid in ids:
        keys = CampaignKeys.of(cid)
        assert len({nodes.keyslot(k) for k in (keys.meta, keys.pool, keys.winners)}) == 1
    assert {m.decode() for m in await cluster_redis.smembers(CAMPAIGNS_SET)} == set(ids)


@pytest.mark.parametrize("shards", [1, 5])
async def test_2000_players_with_retries_on_the_cluster(
    aiohttp_client: Any,
    cluster_settings: Settings,
    cluster_redis: Redis,
    database_url: str,
    shards: int,
) -> None:
    """2,000 players grab two or three times at once (retries racing their original)
    from two workers, on one pool or five sub-pools over the 3 masters: 500 winners
    exactly, nobody twice (in any sub-pool), the sum is the budget, sold out told only
    to players who won nothing once every sub-pool is empty, PostgreSQL == Redis."""
    a = await cluster_app(aiohttp_client, cluster_settings)
    b = await cluster_app(aiohttp_client, cluster_settings)
    cid = str((await create_campaign(a, total_fen=888_888, count=500, shards=shards))["id"])
    pools = spread_pools(cid, shards)
    tokens = await gather_limited([login(a, f"p{i:05d}") for i in range(2000)])
    a.session.cookie_jar.clear()
    # Every player asks both workers; every other player asks the first one again.
    asks = [(t, worker) for i, t in enumerate(tokens) for worker in (a, b, a)[: 2 + i % 2]]
    results = await gather_limited([_grab(worker, t, cid) for t, worker in asks], limit=400)
    by_player: dict[str, list[tuple[str, int]]] = {}
    for (token, _), answer in zip(asks, results, strict=True):
        by_player.setdefault(token, []).append((answer["result"], answer.get("amount_fen", 0)))
    winners = [p for p in by_player.values() if any(res != "sold_out" for res, _ in p)]
    assert len(winners) == 500
    for answers in winners:
        # A retry of a winner says already_won with the same amount, never sold out
        # (the winning sub-pool is on every route), never two different envelopes.
        assert len({amount for _, amount in answers}) == 1, answers
        assert Counter(res for res, _ in answers)["won"] == 1, answers
    assert sum(p[0][1] for p in winners) == 888_888

    for pool_id in pools:
        assert await cluster_redis.llen(CampaignKeys.of(pool_id).pool) == 0
    in_redis = await ledger_equals_sub_pools(cluster_redis, database_url, cid, pools)
    assert len(in_redis) == 500
    assert sum(e.amount_fen for _, e in in_redis.values()) == 888_888
    assert Counter(shard for shard, _ in in_redis.values()) == dict.fromkeys(
        range(shards), 500 // shards
    )
    await reconciled(cluster_redis, database_url, cid)
    stats = await (await a.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert (stats["won_count"], stats["won_fen"], stats["ledger_lag"]) == (500, 888_888, 0)
    assert stats["shards"] == shards
    assert [s["remaining_count"] for s in stats["per_shard"]] == [0] * shards
    assert sum(s["won_fen"] for s in stats["per_shard"]) == 888_888


async def test_many_campaigns_drain_from_every_shard(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis, database_url: str
) -> None:
    """Campaigns on all three masters are drained by one drainer, each exactly."""
    client = await cluster_app(aiohttp_client, cluster_settings)
    nodes = as_cluster(cluster_redis)
    by_master: dict[str, list[str]] = {}
    # Three campaigns on each master (ids are random: create until so, bounded).
    for _ in range(60):
        cid = str((await create_campaign(client, total_fen=1_000, count=20))["id"])
        node = nodes.get_node_from_key(CampaignKeys.of(cid).ledger)
        assert node is not None
        by_master.setdefault(node.name, []).append(cid)
        if len(by_master) == 3 and all(len(c) >= 3 for c in by_master.values()):
            break
    ids = [cid for cids in by_master.values() for cid in cids[:3]]
    assert len(ids) == 9
    tokens = await gather_limited([login(client, f"m{i:03d}") for i in range(30)])
    client.session.cookie_jar.clear()
    results = await gather_limited([_grab(client, t, cid) for cid in ids for t in tokens])
    assert Counter(r["result"] for r in results) == {"won": 180, "sold_out": 90}
    for cid in ids:
        await _drained(cluster_redis, cid)
        await reconciled(cluster_redis, database_url, cid)


async def test_lottery_on_the_cluster(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis, database_url: str
) -> None:
    """Draws settle on the lottery's one shard, within quota, and drain into PostgreSQL."""
    client = await cluster_app(aiohttp_client, cluster_settings)
    resp = await client.post(
        "/api/admin/campaigns", json={**LOTTERY, "quota_daily": None}, headers=ADMIN
    )
    assert resp.status == 201, await resp.text()
    cid = (await resp.json())["id"]
    tokens = await gather_limited([login(client, f"d{i:03d}") for i in range(50)])
    client.session.cookie_jar.clear()

    async def draw(token: str) -> int:
        answer = await client.post(f"/api/campaigns/{cid}/draw", cookies={"hb_session": token})
        return answer.status

    statuses = await gather_limited([draw(t) for t in tokens for _ in range(4)])
    quota = LOTTERY["quota_total"]
    assert Counter(statuses) == {200: 50 * min(4, quota), 429: 50 * max(0, 4 - quota)}
    await _drained(cluster_redis, cid)
    await reconciled(cluster_redis, database_url, cid)


async def test_login_session_and_revocation_across_workers(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis
) -> None:
    """A logout on one worker reaches the other through the cluster's pub/sub (each
    listener may sit on any node), and a new worker learns it when it subscribes."""
    a = await cluster_app(aiohttp_client, cluster_settings)
    b = await cluster_app(aiohttp_client, cluster_settings)
    await until_live(a, b)
    cid = str((await create_campaign(a, total_fen=1_000, count=10))["id"])
    tokens = [await login(a, f"s{i}") for i in range(20)]
    a.session.cookie_jar.clear()

    async def me(worker: TestClient, token: str) -> int:
        resp = await worker.get(f"/api/campaigns/{cid}/me", cookies={"hb_session": token})
        return resp.status

    # Sessions live on every master (no hash tag): b checks them in one split MGET.
    assert await asyncio.gather(*(me(b, t) for t in tokens)) == [200] * 20
    leaver = tokens[0]
    assert (await a.post("/auth/logout", cookies={"hb_session": leaver})).status == 200
    deadline = time.monotonic() + 5
    while await me(b, leaver) != 401:
        assert time.monotonic() < deadline, "b kept accepting a revoked token"
        await asyncio.sleep(0.01)
    c = await cluster_app(aiohttp_client, cluster_settings)
    assert await me(c, leaver) == 401
    assert await me(c, tokens[1]) == 200


async def test_the_launcher_stops_what_it_started(cluster: EmbeddedCluster) -> None:
    """Every node is a child of the launcher: 3 masters with one replica each."""
    nodes = cluster.topology()
    masters = [n for n in nodes if n.master and n.slots]
    assert len(masters) == 3
    assert sorted(len(cluster.replicas_of(m)) for m in masters) == [1, 1, 1]
    assert set(cluster.alive()) == {n.port for n in nodes}


async def test_the_script_line_follows_ask_then_moved_while_a_slot_migrates(
    cluster: EmbeddedCluster, cluster_redis: Redis
) -> None:
    """A campaign's slot moved to another master under the script line: mid-migration
    its calls follow ASK (the map unchanged), after it MOVED (the map updated)."""
    cid = "migrating"
    keys = CampaignKeys.of(cid)
    await cluster_redis.hset(keys.meta, mapping={"starts_at_ms": 0, "ends_at_ms": 2**50})
    await cluster_redis.rpush(keys.pool, "0:100", "1:200", "2:300", "3:400")
    line = ClusterLine.from_url(cluster.url)
    assert line is not None
    scripts = Scripts(cluster_redis, line)
    await scripts.preload(cluster_redis)
    try:
        assert (await scripts.grab_envelope(cid, ["a"])).outcomes == [(GrabCode.WON, 100)]
        slot = as_cluster(cluster_redis).keyslot(keys.pool)
        source = cluster.master_of(slot)
        target = next(n for n in cluster.topology() if n.master and n.slots and n != source)
        src, dst = Redis(port=source.port), Redis(port=target.port)
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        moved_keys = [keys.meta, keys.pool, keys.winners, keys.ledger]
        await src.execute_command(
            "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moved_keys
        )
        assert (await scripts.grab_envelope(cid, ["b"])).outcomes == [(GrabCode.WON, 200)]
        # ASK: served by the target this once, the map still names the source.
        assert line.served_by(slot) == ("127.0.0.1", source.port)
        for node in cluster.topology():
            if node.master and node.slots:
                peer = Redis(port=node.port)
                await peer.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
                await peer.aclose()
        reloads = line.reloads
        assert (await scripts.grab_envelope(cid, ["c", "a"])).outcomes == [
            (GrabCode.WON, 300),
            (GrabCode.ALREADY_WON, 100),
        ]
        # MOVED: the map names the target at once, and is read again in the background.
        assert line.served_by(slot) == ("127.0.0.1", target.port)
        await line.reload(force=True)
        assert line.reloads > reloads
        assert line.served_by(slot) == ("127.0.0.1", target.port)
        assert await dst.hlen(keys.winners) == 3
        assert await dst.llen(keys.pool) == 1
        await src.aclose()
        await dst.aclose()
    finally:
        line.close()


async def test_lag_per_shard_then_a_drain_process_empties_every_shard(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis, database_url: str
) -> None:
    """Without drainers in the workers the lag builds up on each master, reported per
    shard; `python -m app drain` with REDIS_CLUSTER=1 then records everything exactly."""
    quiet = cluster_settings.with_(ledger=LedgerSettings(drain_in_worker=False))
    client: TestClient = await aiohttp_client(create_app(quiet), headers=PAGE)
    ids = [str((await create_campaign(client, total_fen=900, count=9))["id"]) for _ in range(6)]
    tokens = await gather_limited([login(client, f"q{i}") for i in range(5)])
    client.session.cookie_jar.clear()
    await gather_limited([_grab(client, t, cid) for cid in ids for t in tokens])
    nodes = as_cluster(cluster_redis)
    expected: Counter[str] = Counter()
    for cid in ids:
        node = nodes.get_node_from_key(CampaignKeys.of(cid).ledger)
        assert node is not None
        expected[node.name] += 5
    by_campaign = await ledger_lag_by_pool(cluster_redis)
    assert by_shard_of(await ledger_lag_by_shard(cluster_redis, by_campaign)) == expected
    deadline = time.monotonic() + 5
    while True:
        text = await (await client.get("/metrics")).text()
        shown = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("hongbao_shard_ledger_lag{")
        }
        if by_shard_of({k: int(v) for k, v in shown.items()}) == expected:
            break
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.1)

    env = {
        **os.environ,
        "REDIS_URL": cluster_settings.redis_url,
        "REDIS_CLUSTER": "1",
        "DATABASE_URL": database_url,
        "LEDGER_BLOCK_MS": "50",
    }
    drain = subprocess.Popen(
        [sys.executable, "-m", "app", "drain"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for cid in ids:
            await _drained(cluster_redis, cid)
    finally:
        drain.send_signal(signal.SIGTERM)
        _, err = drain.communicate(timeout=20)
    assert drain.returncode == 0, err.decode()
    for cid in ids:
        await reconciled(cluster_redis, database_url, cid)


def by_shard_of(lag: dict[str, int]) -> Counter[str]:
    """The shards with entries waiting, and how many."""
    return Counter({shard: n for shard, n in lag.items() if n})


async def test_operator_list_and_public_results_on_the_cluster(
    aiohttp_client: Any, cluster_settings: Settings, cluster_redis: Redis
) -> None:
    """The campaign list reads every campaign's live part (one pipeline split by master,
    Redis's clock apart) and a sold-out red packet's results come once it is drained."""
    client = await cluster_app(aiohttp_client, cluster_settings)
    ids = [str((await create_campaign(client, total_fen=300, count=3))["id"]) for _ in range(4)]
    tokens = await gather_limited([login(client, f"r{i}") for i in range(3)])
    client.session.cookie_jar.clear()
    await gather_limited([_grab(client, t, ids[0]) for t in tokens])
    resp = await client.get("/api/admin/campaigns", headers=ADMIN)
    listed = await resp.json()
    assert resp.status == 200, listed
    by_id = {c["id"]: c for c in listed["campaigns"]}
    assert set(by_id) == set(ids)
    assert (by_id[ids[0]]["state"], by_id[ids[0]]["won_fen"]) == ("sold_out", 300)
    assert {by_id[c]["state"] for c in ids[1:]} == {"open"}
    await _drained(cluster_redis, ids[0])
    resp = await client.get(f"/api/campaigns/{ids[0]}/results")
    body = await resp.json()
    assert resp.status == 200, body
    assert (body["won_count"], body["won_fen"]) == (3, 300)


async def test_serve_on_a_local_cluster_grabs_and_stops_it(
    tmp_path: Path, database_url: str, cluster_clean: None
) -> None:
    """`./hb serve --redis-cluster 3`: its own 6 nodes, the H5 page and a grab through
    the public port, on one pool and on three sub-pools, and on Ctrl-C every node it
    started is gone."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "ADMIN_TOKEN"}}
    env.update(DATABASE_URL=database_url, EMBEDDED_REDIS_PORT=str(free_port()))
    data_dir = tmp_path / "data"
    argv = [sys.executable, "-m", "app", "serve", "--redis-cluster", "3", "--workers", "1"]
    proc = subprocess.Popen(
        [*argv, "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = b""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops everything" not in output:
            assert time.monotonic() < deadline, output.decode()
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, output.decode()
            output += line
        banner = next(s for s in output.decode().splitlines() if "local Redis Cluster" in s)
        node_ports = [int(p) for p in banner.split("[")[1].split("]")[0].split(", ")]
        assert len(node_ports) == 6
        token = (data_dir / "admin-token").read_text().strip()
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=PAGE
        ) as http:
            async with http.post(
                f"{base}/api/admin/campaigns",
                json={"kind": "red_packet", "name": "集群", "total_fen": 1_000, "count": 3},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 201
                cid = (await resp.json())["id"]
            async with http.get(f"{base}/c/{cid}") as resp:
                assert resp.status == 200
            async with http.post(f"{base}/auth/dev-login", json={"openid": "one"}) as resp:
                assert resp.status == 200
            async with http.post(f"{base}/api/campaigns/{cid}/grab") as resp:
                grab = await resp.json()
            sharded = await _serve_sharded(http, base, token)
        assert grab["result"] == "won"
        assert sharded["shards"] == 3
        assert (sharded["won_count"], sharded["remaining_count"]) == (6, 24)
        assert sum(s["won_count"] for s in sharded["per_shard"]) == 6
        assert sum(s["won_fen"] for s in sharded["per_shard"]) == sharded["won_fen"]
    finally:
        proc.send_signal(signal.SIGINT)
        rest = (await asyncio.to_thread(proc.communicate, timeout=90))[0]
        output += rest
    assert proc.returncode == 0, output.decode()
    assert b"hongbao: stopped" in output
    for node_port in node_ports:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", node_port), 0.5):
            raise AssertionError(f"node on {node_port} still answers")


async def _serve_sharded(http: aiohttp.ClientSession, base: str, token: str) -> dict[str, Any]:
    """A red packet in 3 sub-pools on `./hb serve`'s cluster, its page, 6 players' grabs
    (each won, whichever sub-pool their route reaches); its operator stats."""
    admin = {"Authorization": f"Bearer {token}"}
    body = {"kind": "red_packet", "name": "分片", "total_fen": 3_000, "count": 30, "shards": 3}
    async with http.post(f"{base}/api/admin/campaigns", json=body, headers=admin) as resp:
        assert resp.status == 201, await resp.text()
        cid = (await resp.json())["id"]
    async with http.get(f"{base}/c/{cid}") as resp:
        assert resp.status == 200
    for i in range(6):
        async with http.post(f"{base}/auth/dev-login", json={"openid": f"k{i}"}) as resp:
            assert resp.status == 200
        async with http.post(f"{base}/api/campaigns/{cid}/grab") as resp:
            assert (await resp.json())["result"] == "won"
    async with http.get(f"{base}/api/admin/campaigns/{cid}", headers=admin) as resp:
        stats: dict[str, Any] = await resp.json()
        assert resp.status == 200, stats
    return stats
