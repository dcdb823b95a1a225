"""The production topology as real processes: HAProxy -> 2 workers -> Redis + PostgreSQL.

The drain test SIGTERMs one worker in the middle of a bounded load of grabs by distinct
players, then reloads HAProxy while the load goes on: every request must get a 200
grab result, and what players were told must match Redis exactly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from app.identity.sessions import SessionStore
from app.local.embedded import free_port
from app.local.haproxy import LOCAL_CONFIG, EdgeProxy, haproxy_binary, render_local_config
from app.store.scripts import CampaignKeys
from app.web.accesslog import FLUSH_AFTER_S
from tests.conftest import ADMIN, PAGE, worker_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        haproxy_binary() is None, reason="haproxy not installed (.ci/run installs it)"
    ),
]

DRAIN_DELAY_S = 1.5
SHUTDOWN_TIMEOUT_S = 10
SESSION_RATE = 20


@dataclass
class Topology:
    """Running processes and where to reach them."""

    tmp: Path
    redis_url: str
    database_url: str
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    worker_ports: dict[str, int] = field(default_factory=dict)
    edge: EdgeProxy | None = None
    socket_path: Path | None = None
    stats_port: int = 0

    @property
    def url(self) -> str:
        assert self.edge is not None
        return f"http://127.0.0.1:{self.edge.public_port}"

    def start_worker(self, name: str) -> None:
        port = free_port()
        env = worker_env(
            self.redis_url,
            self.database_url,
            port,
            DRAIN_DELAY_S=str(DRAIN_DELAY_S),
            SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S),
            # Every answer logged: grab_lines() tallies each worker's grabs from its log.
            ACCESS_LOG_SAMPLE="1",
        )
        out = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "app", "worker"], env=env, stdout=out, stderr=out
        )
        out.close()
        self.worker_ports[name] = port

    def start_edge(self) -> None:
        config = self.tmp / "haproxy.cfg"
        config.write_text(
            render_local_config(LOCAL_CONFIG.read_text(), list(self.worker_ports.values()))
        )
        public = free_port()
        self.stats_port = free_port()
        self.socket_path = self.tmp / "haproxy.sock"
        env = {
            **os.environ,
            "HB_BIND": f"127.0.0.1:{public}",
            "HB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "HB_STATS_SOCKET": str(self.socket_path),
            "HB_CHECK_INTER": "250ms",
            # Every test request comes from 127.0.0.1: lift the per-IP limit, keep the
            # per-session one as configured.
            "HB_IP_RATE": "1000000",
            "HB_SESSION_RATE": str(SESSION_RATE),
        }
        self.edge = EdgeProxy(config, public, env).start(self.tmp / "haproxy.log")

    def server_status(self) -> dict[str, str]:
        """HAProxy's view of each worker (UP, DOWN, ...), from the admin socket."""
        assert self.socket_path is not None
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket_path))
            sock.sendall(b"show stat\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        lines = raw.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "workers" and row["svname"] not in {"FRONTEND", "BACKEND"}
        }

    def wait_all_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.workers.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {(self.tmp / f'{name}.log').read_text()}")
            statuses = self.server_status()
            if statuses and all(s == "UP" for s in statuses.values()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"workers not UP behind HAProxy: {self.server_status()}")

    def grab_lines(self, name: str) -> int:
        """How many grabs worker ``name`` answered, from its JSON access log."""
        count = 0
        for line in (self.tmp / f"{name}.log").read_text().splitlines():
            if line.startswith("{"):
                entry = orjson.loads(line)
                count += entry.get("route") == "/api/campaigns/{id}/grab"
        return count

    def grabs_while_draining(self, name: str) -> int:
        """Grabs worker ``name`` answered after SIGTERM, before it stopped accepting."""
        lines = (self.tmp / f"{name}.log").read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if "draining:" in line)
        end = next(i for i, line in enumerate(lines) if "stopping:" in line)
        return sum("/api/campaigns/{id}/grab" in line for line in lines[start:end])

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.edge is not None:
            self.edge.stop(timeout=5)


@pytest.fixture
def topology(tmp_path: Path, redis_url: str, database_url: str, clean: None) -> Iterator[Topology]:
    """HAProxy in front of two worker processes, all against the test stores."""
    topo = Topology(tmp_path, redis_url, database_url)
    try:
        topo.start_worker("w1")
        topo.start_worker("w2")
        topo.start_edge()
        topo.wait_all_up()
        yield topo
    finally:
        topo.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client without a cookie jar: every request names its session explicitly."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=32),
        headers=PAGE,
    ) as session:
        yield session


async def create_campaign(http: aiohttp.ClientSession, url: str, total: int, count: int) -> str:
    body = {"kind": "red_packet", "name": "drain", "total_fen": total, "count": count}
    async with http.post(f"{url}/api/admin/campaigns", json=body, headers=ADMIN) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["id"])


async def assert_ledger_matches_winners(
    redis: Redis, database_url: str, cid: str, told_won: dict[str, int]
) -> None:
    """Once the drainers are done, PostgreSQL holds exactly what players were told they won.

    The surviving worker's drainer claims whatever the stopped one left pending, so the
    stream empties (bounded wait) and the grabs table equals ``told_won`` exactly.
    """
    stream = CampaignKeys.of(cid).ledger
    deadline = time.monotonic() + 60
    while await redis.xlen(stream) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await redis.xlen(stream) == 0, "the ledger stream did not drain"
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT openid, amount_fen FROM grabs WHERE campaign_id = $1", cid)
        rejects = await conn.fetchval(
            "SELECT count(*) FROM ledger_rejects WHERE campaign_id = $1", cid
        )
    finally:
        await conn.close()
    assert {r["openid"]: r["amount_fen"] for r in rows} == told_won
    assert len(rows) == len(told_won)
    assert rejects == 0


async def test_sigterm_one_worker_under_load_loses_nothing(
    topology: Topology, http: aiohttp.ClientSession, redis_url: str
) -> None:
    url = topology.url
    envelopes, total_fen = 1500, 1_000_000
    cid = await create_campaign(http, url, total_fen, envelopes)
    redis = Redis.from_url(redis_url)
    # Enough players that the load outlasts w1's drain and 600 grabs more even on a fast
    # machine; the loop stops as soon as its conditions hold.
    max_players = 20000
    tokens = await SessionStore(redis, 3600).mint([f"p{i:05d}" for i in range(max_players)])

    results: dict[str, tuple[int, dict[str, object]]] = {}
    done_after_exit = 0
    w1 = topology.workers["w1"]
    w1_exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    players = iter(enumerate(tokens))
    under_way = asyncio.Event()

    async def grab_as(index: int, token: str) -> None:
        nonlocal done_after_exit
        async with http.post(
            f"{url}/api/campaigns/{cid}/grab", headers={"Cookie": f"hb_session={token}"}
        ) as resp:
            body = await resp.read()
            results[f"p{index:05d}"] = (resp.status, orjson.loads(body))
        if len(results) >= 500:
            under_way.set()
        if w1_exit.done():
            done_after_exit += 1

    async def player_loop() -> None:
        # Each player grabs once. Keep going until w1 has exited, HAProxy has reloaded,
        # enough grabs ran after that and the envelopes are gone; never beyond max_players.
        for index, token in players:
            if w1_exit.done() and done_after_exit >= 600 and len(results) >= 2000:
                return
            await grab_as(index, token)

    async def terminate_w1_then_reload() -> None:
        await under_way.wait()
        w1.send_signal(signal.SIGTERM)
        w1_exit.set_result(await asyncio.to_thread(w1.wait))
        # A seamless reload while traffic flows; the new HAProxy process starts with w1
        # marked UP until its checks fail, so connections to it are refused and retried
        # on w2 (retry-on conn-failure), never answered with an error.
        assert topology.edge is not None
        topology.edge.reload()

    await asyncio.gather(terminate_w1_then_reload(), *(player_loop() for _ in range(24)))
    await redis.aclose()

    assert w1_exit.result() == 0, (topology.tmp / "w1.log").read_text()[-2000:]
    assert done_after_exit >= 600
    failed = {p: r for p, r in results.items() if r[0] != 200}
    assert not failed, list(failed.items())[:5]
    outcomes = Counter(str(body["result"]) for _, body in results.values())
    assert set(outcomes) <= {"won", "sold_out"}
    assert outcomes["won"] == envelopes
    told_won = {
        p: int(str(body["amount_fen"]))
        for p, (_, body) in results.items()
        if body["result"] == "won"
    }
    assert sum(told_won.values()) == total_fen

    redis = Redis.from_url(redis_url)
    try:
        winners = await redis.hgetall(CampaignKeys.of(cid).winners)
        in_redis = {k.decode(): int(v.rsplit(b":", 1)[1]) for k, v in winners.items()}
        assert in_redis == told_won
        assert await redis.llen(CampaignKeys.of(cid).pool) == 0
        meta = await redis.hmget(CampaignKeys.of(cid).meta, "won_count", "won_fen")
        assert [int(v) for v in meta] == [envelopes, total_fen]
        await assert_ledger_matches_winners(redis, topology.database_url, cid, told_won)
    finally:
        await redis.aclose()
    # Both workers took part: the drained one served grabs before it left.
    assert topology.grab_lines("w1") > 0
    assert topology.grab_lines("w2") > 0
    # w2 is still running: its last lines reach the file within FLUSH_AFTER_S.
    deadline = time.monotonic() + 2
    while topology.grab_lines("w1") + topology.grab_lines("w2") < len(results):
        assert time.monotonic() < deadline, "access lines missing"
        await asyncio.sleep(FLUSH_AFTER_S)
    assert topology.grab_lines("w1") + topology.grab_lines("w2") == len(results)
    # HAProxy kept sending to w1 until its checks saw /readyz fail; w1 served those.
    assert topology.grabs_while_draining("w1") > 0
    assert "stopped cleanly" in (topology.tmp / "w1.log").read_text()


async def test_edge_rate_limits_request_ids_and_json_errors(
    topology: Topology, http: aiohttp.ClientSession, redis_url: str
) -> None:
    url = topology.url
    cid = await create_campaign(http, url, 100, 1)
    redis = Redis.from_url(redis_url)
    (token,) = await SessionStore(redis, 3600).mint(["chatty"])
    await redis.aclose()

    statuses = []
    for _ in range(SESSION_RATE + 10):
        async with http.get(
            f"{url}/api/campaigns/{cid}/me", headers={"Cookie": f"hb_session={token}"}
        ) as resp:
            body = await resp.json()
            statuses.append(resp.status)
            if resp.status == 429:
                assert body["error"] == "rate_limited"
                assert resp.headers["Content-Type"] == "application/json"
                assert resp.headers["Retry-After"] == "10"
            else:
                assert body == {"result": "none"}
    # The per-session limit is exact: the first SESSION_RATE pass, the rest are refused.
    assert statuses == [200] * SESSION_RATE + [429] * 10
    # Another session from the same address is not affected (the per-IP limit is generous).
    async with http.get(f"{url}/api/campaigns/{cid}") as resp:
        assert resp.status == 200

    async with http.get(f"{url}/healthz") as resp:
        made = resp.headers["X-Request-ID"]
        assert len(made) == 36  # a UUID from HAProxy's unique-id-format
    async with http.get(f"{url}/healthz", headers={"X-Request-ID": "trace-me-7"}) as resp:
        assert resp.headers["X-Request-ID"] == "trace-me-7"

    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    async with http.get(f"http://127.0.0.1:{topology.stats_port}/metrics") as resp:
        assert resp.status == 200
        assert 'haproxy_backend_active_servers{proxy="workers"} 2' in await resp.text()

    # With every worker gone, HAProxy answers in the API's JSON error shape.
    for proc in topology.workers.values():
        proc.send_signal(signal.SIGTERM)
    for proc in topology.workers.values():
        assert await asyncio.to_thread(proc.wait) == 0
    async with http.get(f"{url}/api/campaigns/{cid}") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "unavailable"


def test_serve_puts_haproxy_in_front(tmp_path: Path, redis_url: str, database_url: str) -> None:
    """`./hb serve` (python -m app serve) runs HAProxy before the workers, and stops it all."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "DRAIN_DELAY_S": "0.5",
        "ACCESS_LOG": "0",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline().decode() for _ in range(5)]
        assert banner[0].startswith("fake WeChat (web authorization) at http://127.0.0.1:"), banner
        assert banner[1].startswith("fake WeChat Pay (merchant transfer) at http://127.0.0.1:")
        assert banner[2].startswith(f"HAProxy on :{port} -> workers on"), banner
        assert banner[3].startswith("HAProxy stats: http://127.0.0.1:"), banner
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    request_id = r.headers["X-Request-ID"]
                    break
            except OSError:
                assert time.monotonic() < deadline, "never ready"
                time.sleep(0.2)
        # HAProxy makes UUIDs; a worker reached directly would make a 16-digit hex id.
        assert len(request_id) == 36
        assert "balance leastconn" in (tmp_path / "haproxy.cfg").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        proc.stdout.close()
    assert code == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
