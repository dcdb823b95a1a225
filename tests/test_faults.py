"""Faults under load, through the real HAProxy in front of real worker processes.

Each test owns its stack (app.local.chaos.Stack): redis-server with AOF, PostgreSQL, a
TCP proxy between the workers and Redis that can go silent, two workers and HAProxy,
all on free loopback ports. What players were told is checked against what Redis and
PostgreSQL hold afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.background.events import Events
from app.campaigns import operations
from app.local.chaos import Load, SilentProxy, Stack, create_campaign, mint_players, verdict
from app.local.embedded import EmbeddedRedis, free_port
from app.local.haproxy import haproxy_binary
from app.model import Campaign, Kind
from app.redpacket import soldout
from app.redpacket.soldout import SoldOut, WinnersIndex
from app.redpacket.spec import RedPacketSpec
from app.settings import Settings, SettingsError
from app.store import ledger
from app.store.scriptline import ScriptLine
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN_TOKEN, PAGE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        haproxy_binary() is None, reason="haproxy not installed (.ci/run installs it)"
    ),
]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Two workers (each with its drainer) behind HAProxy, Redis behind a silent-capable proxy."""
    async with Stack(tmp_path, drain_in_worker=True) as running:
        yield running


async def get_json(url: str) -> tuple[int, dict[str, object]]:
    """GET ``url``: status and JSON body (status 0 if nothing answered in 3 s)."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as resp,
        ):
            return resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return 0, {}


async def metric(port: int, name: str) -> float:
    """One sample of this worker's /metrics."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


async def start_load(stack: Stack, name: str, players: int) -> tuple[Load, asyncio.Task[None]]:
    cid = await create_campaign(stack.url, name)
    load = Load(stack.url, cid, await mint_players(stack.redis_url, f"{name}-", players))
    return load, asyncio.create_task(load.run())


@pytest.fixture
async def patient_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """The stack of ``stack``, its workers waiting up to 5 s for Redis instead of 1 s.

    PostgreSQL's shutdown checkpoint and Redis's fsync-always AOF share this machine's
    disk: once in CI (2026-12-01) the stop held every Redis reply for over a second, and
    13 of 45,816 grabs got 503 from the 1 s timeout. What the PostgreSQL test asserts is
    that PostgreSQL's absence costs no grab, not how a shared disk behaves."""
    async with Stack(tmp_path, drain_in_worker=True, redis_timeout_ms=5000) as running:
        yield running


async def test_postgres_down_20s_every_grab_through_haproxy_still_200(
    patient_stack: Stack,
) -> None:
    stack = patient_stack
    load, running = await start_load(stack, "pgdown", 60_000)
    await asyncio.sleep(2)
    assert stack.pg is not None
    stack.pg.stop()
    port = stack.worker_ports[0]
    readiness, ledger = [], []
    outage_end = time.monotonic() + 20
    while time.monotonic() < outage_end:
        readiness.append((await get_json(f"http://127.0.0.1:{port}/readyz"))[0])
        ledger.append(await get_json(f"http://127.0.0.1:{port}/healthz/ledger"))
        await asyncio.sleep(0.5)
    up_during = await metric(port, "hongbao_ledger_up")
    stack.pg.start()
    await asyncio.sleep(2)
    load.stopped.set()
    await asyncio.wait_for(running, 60)

    answers = load.all_answers()
    assert len(answers) > 2000, "too little load to mean anything"
    assert Counter(a.status for a in answers) == {200: len(answers)}
    # Readiness never followed PostgreSQL; its own health did, as JSON.
    assert set(readiness) == {200}
    assert {status for status, _ in ledger} == {503}
    assert all(body["ledger"] == "down" and body["error"] for _, body in ledger)
    assert up_during == 0
    assert await get_json(f"http://127.0.0.1:{port}/healthz/ledger") == (200, {"ledger": "up"})
    assert await metric(port, "hongbao_ledger_up") == 1

    result = await verdict(stack.redis_url, stack.database_url, "pgdown", load)
    assert result.told == len(answers)
    assert result.exact, result.render()
    assert result.unacknowledged == 0


async def test_a_worker_restarted_while_postgres_is_down_serves_grabs(stack: Stack) -> None:
    """The orchestrator replaces a worker during a PostgreSQL outage: it starts without
    PostgreSQL, grabs through HAProxy, and once PostgreSQL is back its grants are
    recorded and the books balance."""
    cid = await create_campaign(stack.url, "restart-pgdown", count=1000)
    players = await mint_players(stack.redis_url, "rpg-", 40)
    assert stack.pg is not None
    stack.pg.stop()
    stack.kill("w1")
    stack.start_worker(0)
    await stack.wait_workers_ready(30)
    port = stack.worker_ports[0]
    won: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        for openid, token in players.items():
            async with http.post(
                f"http://127.0.0.1:{port}/api/campaigns/{cid}/grab",
                headers={**PAGE, "Cookie": f"hb_session={token}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            assert body["result"] == "won", body
            won[openid] = body["amount_fen"]
    assert (await get_json(f"http://127.0.0.1:{port}/healthz/ledger"))[0] == 503
    stack.pg.start()
    redis = Redis.from_url(stack.redis_url)
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=1)
    try:
        deadline = time.monotonic() + 60
        while await redis.xlen(CampaignKeys.of(cid).ledger):
            assert time.monotonic() < deadline, "the restarted worker never drained"
            await asyncio.sleep(0.2)
        recorded = await ledger.fetch_grabs(pool, cid)
        assert {u: e.amount_fen for u, e in recorded.items()} == won
        report = await operations.reconcile(redis, pool, cid)
        assert report.ok, report.render()
    finally:
        await pool.close()
        await redis.aclose()


async def test_silent_redis_fails_grabs_fast_then_recovers_exactly(stack: Stack) -> None:
    assert stack.proxy is not None
    load, running = await start_load(stack, "silent", 60_000)
    await asyncio.sleep(2)
    silent_at = time.monotonic()
    stack.proxy.go_silent()
    port = stack.worker_ports[0]
    readiness: list[tuple[float, int]] = []
    while time.monotonic() < silent_at + 6:
        status, _ = await get_json(f"http://127.0.0.1:{port}/readyz")
        readiness.append((time.monotonic() - silent_at, status))
        await asyncio.sleep(0.2)
    stack.proxy.speak()
    spoke_at = time.monotonic()
    recovered: float | None = None
    while recovered is None and time.monotonic() < spoke_at + 15:
        if (await get_json(f"http://127.0.0.1:{port}/readyz"))[0] == 200:
            recovered = time.monotonic() - spoke_at
        await asyncio.sleep(0.1)
    await asyncio.sleep(3)
    load.stopped.set()
    await asyncio.wait_for(running, 60)

    answers = load.all_answers()
    failures = [a for a in answers if a.status != 200]
    assert failures, "the silence was never noticed"
    # Fail fast, not a hang: a grab waits at most for the batch ahead of it and its own,
    # each bounded by REDIS_TIMEOUT_MS (1 s here) plus the watchdog's quarter.
    assert max(a.seconds for a in failures) < 3.0
    # Every failure is a JSON 503 "unavailable" (the worker's, or HAProxy's own once
    # the health checks took the workers out).
    assert {(a.status, a.body.get("error")) for a in failures} == {(503, "unavailable")}
    # Readiness reflected it: 503 within about the timeout, for the rest of the silence.
    late = [status for at, status in readiness if at > 2.5]
    assert late
    assert set(late) == {503}
    assert recovered is not None, "the worker never became ready again"
    assert recovered < 5
    # Grabs went through again after the silence.
    assert any(a.status == 200 for a in load.answers[next(reversed(load.answers))])

    result = await verdict(stack.redis_url, stack.database_url, "silent", load)
    # Nobody told "won" is missing or has another amount; nobody was told "won" twice
    # (a retry after a lost reply is told "already_won", the same amount).
    assert result.exact, result.render()


async def test_sell_out_of_a_million_winners_never_stalls_the_loop(stack: Stack) -> None:
    winners = 1_000_000
    cid = await create_campaign(stack.url, "million", count=2)
    redis = Redis.from_url(stack.redis_url)
    try:
        key = CampaignKeys.of(cid).winners
        # The winners hash, loaded directly (this is about the index, not about grabs).
        for start in range(0, winners, 50_000):
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(start, start + 50_000):
                    pipe.hset(key, f"m{i:07d}", f"{i + 2}:1")
                await pipe.execute()
        tokens = await mint_players(stack.redis_url, "sell-", 3)
        ports = stack.worker_ports
        # The machine's own noise (other processes on a shared CPU), measured idle with
        # the same probing, is allowed on top of the 50 ms.
        baseline = 0.0
        idle_end = time.monotonic() + 6
        while time.monotonic() < idle_end:
            for p in ports:
                await get_json(f"http://127.0.0.1:{p}/readyz")
                baseline = max(baseline, await metric(p, "hongbao_loop_stall_recent_max_seconds"))
            await asyncio.sleep(0.2)
        async with aiohttp.ClientSession(headers=PAGE) as http:
            for token in list(tokens.values())[:2]:  # the last two envelopes: sold out
                async with http.post(
                    f"{stack.url}/api/campaigns/{cid}/grab",
                    headers={"Cookie": f"hb_session={token}"},
                ) as resp:
                    body = await resp.json()
                    assert body.get("result") == "won", body
        sold_at = time.monotonic()
        # Both workers build the index at once; readiness answers all along.
        loaded: dict[int, float] = {}
        worst = 0.0
        while len(loaded) < len(ports) and time.monotonic() < sold_at + 60:
            for p in ports:
                status, _ = await get_json(f"http://127.0.0.1:{p}/readyz")
                assert status == 200
                worst = max(worst, await metric(p, "hongbao_loop_stall_recent_max_seconds"))
                if p not in loaded and await _answers_from_memory(stack, cid, p, redis):
                    loaded[p] = time.monotonic() - sold_at
            await asyncio.sleep(0.2)
        assert len(loaded) == len(ports), "the winners index never loaded"
        # The stall gauge covers the last 5-10 s: read it once more after the load.
        await asyncio.sleep(1)
        for p in ports:
            worst = max(worst, await metric(p, "hongbao_loop_stall_recent_max_seconds"))
    finally:
        await redis.aclose()
    print(
        f"1M-winner index: loaded after {loaded} s; worst loop stall {worst * 1000:.1f} ms "
        f"(idle baseline {baseline * 1000:.1f} ms)"
    )
    assert worst < 0.05 + baseline, "the event loop stalled while the index loaded"


async def _answers_from_memory(stack: Stack, cid: str, port: int, redis: Redis) -> bool:
    """Whether worker ``port`` answers a loser of ``cid`` without asking Redis."""
    token = (await mint_players(stack.redis_url, f"probe{port}-", 1)).popitem()[1]
    before = await _calls(redis)
    async with (
        aiohttp.ClientSession(headers=PAGE) as http,
        http.post(
            f"http://127.0.0.1:{port}/api/campaigns/{cid}/grab",
            headers={"Cookie": f"hb_session={token}"},
        ) as resp,
    ):
        assert (await resp.json())["result"] == "sold_out"
    return await _calls(redis) == before


async def _calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "hmget", "hget")
    )


async def test_winners_index_of_a_million_builds_in_chunks(
    private_redis_server: EmbeddedRedis,
) -> None:
    """Direct: every winner found, few false hits, bounded memory (2 bytes per winner)."""
    redis = Redis.from_url(private_redis_server.url)
    key = CampaignKeys.of("big").winners
    for start in range(0, 1_000_000, 50_000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, start + 50_000):
                pipe.hset(key, f"u{i:07d}", f"{i}:1")
            await pipe.execute()
    index = await WinnersIndex.load(redis, "big")
    assert len(index) == 1_000_000
    assert all(f"u{i:07d}" in index for i in range(0, 1_000_000, 97))
    assert sum(f"x{i:07d}" in index for i in range(20_000)) < 20_000 * 0.01
    assert index.nbytes <= 4 * 1_000_000
    await redis.aclose()


def _children(pid: int) -> list[int]:
    raw = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in raw]


def _worker_ports(supervisor: int) -> dict[int, int]:
    """pid -> port of the supervisor's worker processes."""
    out = {}
    for child in _children(supervisor):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmdline:
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            out[child] = int(env[b"PORT"])
    return out


def _haproxy_status(socket_path: Path) -> dict[str, str]:
    """server address -> HAProxy's status of it (UP, DOWN, ...)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(b"show servers state workers\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    out = {}
    for line in raw.decode().splitlines()[2:]:
        fields = line.split()
        if len(fields) > 5:
            # srv_addr is field 4, srv_op_state field 5 (2 = running), srv_port field 18.
            out[f"{fields[4]}:{fields[18]}"] = "UP" if fields[5] == "2" else "DOWN"
    return out


async def test_serve_restarts_a_sigkilled_worker_under_load(
    tmp_path: Path, redis_url: str, database_url: str, clean: None
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "HB_IP_RATE": "10000000",
        "HB_SESSION_RATE": "1000",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - owned by the child
    serve = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--workers", "2", "--port", str(port),
         "--data-dir", str(tmp_path / "data")],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    try:
        deadline = time.monotonic() + 90
        while b"worker(s) on" not in (tmp_path / "serve.log").read_bytes():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "./hb serve never became ready"
            await asyncio.sleep(0.2)
        cid = await _create(f"http://127.0.0.1:{port}")
        load = Load(f"http://127.0.0.1:{port}", cid, await mint_players(redis_url, "rs-", 40_000))
        running = asyncio.create_task(load.run())
        await asyncio.sleep(2)
        workers = _worker_ports(serve.pid)
        assert len(workers) == 2
        victim, victim_port = next(iter(workers.items()))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        back: float | None = None
        socket_path = tmp_path / "data" / "haproxy.sock"
        while back is None and time.monotonic() < killed_at + 10:
            status, _ = await get_json(f"http://127.0.0.1:{victim_port}/readyz")
            state = _haproxy_status(socket_path).get(f"127.0.0.1:{victim_port}")
            if status == 200 and state == "UP":
                back = time.monotonic() - killed_at
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        load.stopped.set()
        await asyncio.wait_for(running, 60)
        assert serve.poll() is None, "the supervisor stopped"
        assert back is not None, "the killed worker never came back"
        assert back < 5
        new_workers = _worker_ports(serve.pid)
        assert victim not in new_workers
        assert sorted(new_workers.values()) == sorted(workers.values())

        answers = load.all_answers()
        failures = [a for a in answers if a.status != 200]
        # Only what the killed worker had in flight failed (at most one request per lane).
        assert len(failures) <= load.concurrency, Counter(a.status for a in failures)
        assert all(a.body.get("error") for a in failures)
        result = await verdict(redis_url, database_url, "restart", load)
        assert result.exact, result.render()
        assert result.told > 1000
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()


async def _create(url: str) -> str:
    body = {"kind": "red_packet", "name": "restart", "total_fen": 10_000_000, "count": 100_000}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/api/admin/campaigns",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp,
    ):
        data = await resp.json()
        assert resp.status == 201, data
        return str(data["id"])


async def test_script_line_times_out_on_a_silent_redis_then_reconnects(
    private_redis_server: EmbeddedRedis,
) -> None:
    proxy = await SilentProxy(private_redis_server.port).start()
    line = ScriptLine.from_url(proxy.url, timeout_s=0.5)
    assert line is not None
    try:
        assert await line.call("PING") == b"PONG"
        proxy.go_silent()
        start = time.monotonic()
        results = await asyncio.gather(
            *(line.call("ECHO", f"n{i}") for i in range(50)), return_exceptions=True
        )
        elapsed = time.monotonic() - start
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        # The watchdog looks every quarter of the timeout.
        assert 0.5 <= elapsed < 0.5 * 1.25 + 0.3
        proxy.speak()
        # A new connection: the old one was aborted, its late replies go nowhere.
        assert await line.call("ECHO", "again") == b"again"
        # Slow but within the bound is no timeout.
        proxy.go_silent()
        pending = asyncio.ensure_future(line.call("ECHO", "slow"))
        await asyncio.sleep(0.2)
        proxy.speak()
        assert await pending == b"slow"
    finally:
        line.close()
        await proxy.close()


def test_redis_timeout_must_outlast_the_drainers_block() -> None:
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1/x",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "REDIS_TIMEOUT_MS": "1000",
        "LEDGER_BLOCK_MS": "1000",
    }
    with pytest.raises(SettingsError, match="REDIS_TIMEOUT_MS"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "REDIS_TIMEOUT_MS": "1500"}).redis_timeout_ms == 1500
    assert Settings.from_env({**env, "REDIS_TIMEOUT_MS": ""}).redis_timeout_ms == 2000


async def test_sold_out_indexes_bounded_and_ended_ones_evicted(
    private_redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one process: the least recently used index goes past the memory bound, and an
    ended campaign's index goes at its next grab (grabs then ask Redis again)."""
    redis = Redis.from_url(private_redis_server.url)
    events = Events(redis)
    stop = asyncio.Event()
    listener = asyncio.create_task(events.run(stop))
    # Room for two minimum-size indexes.
    monkeypatch.setattr(soldout, "MAX_TOTAL_BYTES", 2 * soldout.MIN_INDEX_BYTES)
    known = SoldOut(redis, events)
    spec = RedPacketSpec(total_fen=100, count=1, min_fen=1, max_fen=None)
    now = int(time.time() * 1000)
    ended = Campaign("c-ended", Kind.RED_PACKET, "ended", None, now + 1500, spec)
    camps = [Campaign(f"c{i}", Kind.RED_PACKET, f"c{i}", None, None, spec) for i in range(3)]
    try:
        while not events.live:
            await asyncio.sleep(0.01)
        for campaign in [ended, *camps]:
            await redis.hset(CampaignKeys.of(campaign.id).winners, "winner", "0:100")

        async def learned(campaign: Campaign[RedPacketSpec]) -> None:
            await events.publish("sold_out", campaign.id)
            deadline = time.monotonic() + 5
            while not known.surely_lost(campaign.id, "loser"):
                assert time.monotonic() < deadline, "the index never loaded"
                await asyncio.sleep(0.01)

        await learned(ended)
        await learned(camps[0])
        # A third index pushes out the least recently used one (ended: camps[0] was
        # loaded after it); still known sold out, its grabs now confirmed in Redis.
        await learned(camps[1])
        assert known.knows(ended, ended.id)
        assert not known.surely_lost(ended.id, "loser")
        assert known.surely_lost(camps[0].id, "loser")
        assert known.surely_lost(camps[1].id, "loser")
        # Once ended, the campaign is forgotten at its next grab.
        await asyncio.sleep(1.6)
        assert not known.knows(ended, ended.id)
        assert not known.surely_lost(ended.id, "loser")
        assert known.knows(camps[1], camps[1].id)
        assert not known.surely_lost(camps[1].id, "winner")
    finally:
        await known.close()
        stop.set()
        await listener
        await redis.aclose()
