"""Health, readiness, /metrics and the JSON access log, on an in-process app."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app.background.drainer import Drainer
from app.background.lag import ledger_lag, watch_lag
from app.background.tasks import stop_loop
from app.local.embedded import EmbeddedRedis, free_port
from app.metrics import Metrics, Pseudonyms
from app.settings import Settings, SettingsError
from app.store.scripts import CAMPAIGNS_SET
from app.web.accesslog import FLUSH_AFTER_S, FLUSH_LINES, AccessLog
from app.web.edge import UNMATCHED
from app.web.factory import create_app
from app.web.keys import ACCESS_LOG, PG, READINESS, REDIS, SCRIPTS
from tests.conftest import ADMIN, ADMIN_TOKEN, PAGE, create_campaign, login
from tests.test_ledger import FAST, MANUAL

GRAB_ROUTE = "/api/campaigns/{id}/grab"


async def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: (sample name, sorted labels) -> value."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_healthz_and_readyz(client: TestClient) -> None:
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready"}


async def test_readyz_fails_while_draining_but_requests_are_served(client: TestClient) -> None:
    campaign = await create_campaign(client, total_fen=100, count=1)
    await login(client, "late")
    client.app[READINESS].start_draining()
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"status": "draining"}
    # Draining only takes the worker out of rotation; what still arrives is served.
    resp = await client.post(f"/api/campaigns/{campaign['id']}/grab")
    assert resp.status == 200
    assert (await resp.json())["result"] == "won"
    assert (await client.get("/healthz")).status == 200


async def test_readyz_reloads_scripts_redis_lost(client: TestClient, redis: Redis) -> None:
    scripts = client.app[SCRIPTS]
    await redis.script_flush()
    resp = await client.get("/readyz")
    assert resp.status == 200
    # readyz loaded them again: nothing is missing any more.
    assert await scripts.ensure_loaded(redis) == 0
    await redis.script_flush()
    assert await scripts.ensure_loaded(redis) >= 1


async def test_metrics_count_requests_and_grab_outcomes(client: TestClient) -> None:
    campaign = await create_campaign(client, total_fen=300, count=2)
    cid = campaign["id"]
    tokens = await asyncio.gather(*(login(client, f"m{i}") for i in range(3)))
    client.session.cookie_jar.clear()
    for token in [*tokens, tokens[0]]:
        resp = await client.post(f"/api/campaigns/{cid}/grab", cookies={"hb_session": token})
        assert resp.status == 200
    assert (await client.post(f"/api/campaigns/{cid}/grab")).status == 401
    assert (await client.get("/no/such/path/123")).status == 404

    samples = await scrape(client)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("hongbao_grabs_total", result="won") == 2
    assert value("hongbao_grabs_total", result="sold_out") == 1
    assert value("hongbao_grabs_total", result="already_won") == 1
    ok = {"route": GRAB_ROUTE, "method": "POST"}
    assert value("hongbao_http_requests_total", **ok, status="200") == 4
    assert value("hongbao_http_requests_total", **ok, status="401") == 1
    # Unknown paths share one label value: a scanner cannot blow up the series count.
    assert value("hongbao_http_requests_total", route=UNMATCHED, method="GET", status="404") == 1
    assert value("hongbao_http_request_duration_seconds_count", route=GRAB_ROUTE) == 5
    assert value("hongbao_http_request_duration_seconds_bucket", route=GRAB_ROUTE, le="+Inf") == 5
    assert ("hongbao_ledger_lag", ()) in samples
    assert ("hongbao_redis_errors_total", ()) in samples
    assert not [labels for _, labels in samples if "/no/such" in str(labels)]


async def test_each_app_has_its_own_registry(aiohttp_client, settings: Settings) -> None:  # type: ignore[no-untyped-def]

    a = await aiohttp_client(create_app(settings), headers=PAGE)
    b = await aiohttp_client(create_app(settings), headers=PAGE)
    for _ in range(3):
        await a.get("/healthz")
    healthz = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
    assert (await scrape(a))[("hongbao_http_requests_total", healthz)] == 3
    assert ("hongbao_http_requests_total", healthz) not in await scrape(b)


async def test_one_json_access_line_per_request_with_hashed_openid(
    aiohttp_client,  # type: ignore[no-untyped-def]
    settings: Settings,
) -> None:

    out = io.BytesIO()
    app = create_app(settings.with_(log_salt="pepper"), AccessLog(out))
    client = await aiohttp_client(app, headers=PAGE)
    campaign = await create_campaign(client, total_fen=100, count=1)
    await login(client, "wx-openid-secret")
    app[ACCESS_LOG].flush()
    out.seek(0)
    out.truncate()
    resp = await client.post(
        f"/api/campaigns/{campaign['id']}/grab", headers={"X-Request-ID": "req-42"}
    )
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "req-42"
    anonymous = await client.get(f"/api/campaigns/{campaign['id']}")
    assert (await client.get("/healthz")).status == 200
    app[ACCESS_LOG].flush()  # else written within FLUSH_AFTER_S
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 2
    assert all("wx-openid-secret" not in line for line in lines)
    grab, view = (orjson.loads(line) for line in lines)
    assert grab["request_id"] == "req-42"
    assert grab["route"] == GRAB_ROUTE
    assert (grab["method"], grab["status"]) == ("POST", 200)
    assert grab["user"] == Pseudonyms("pepper")("wx-openid-secret")
    assert len(grab["user"]) == 16
    assert grab["user"] != Pseudonyms("")("wx-openid-secret")
    assert isinstance(grab["duration_ms"], float)
    assert grab["duration_ms"] >= 0
    # Without an incoming id the worker makes one and returns it; no session, no user.
    assert view["route"] == "/api/campaigns/{id}"
    assert view["user"] is None
    assert view["request_id"] == anonymous.headers["X-Request-ID"]
    assert len(view["request_id"]) == 16


async def test_oversized_request_id_is_replaced(client: TestClient) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "x" * 65})
    assert resp.headers["X-Request-ID"] != "x" * 65
    assert len(resp.headers["X-Request-ID"]) == 16


async def test_access_log_can_be_turned_off(
    aiohttp_client,  # type: ignore[no-untyped-def]
    settings: Settings,
) -> None:

    out = io.BytesIO()
    app = create_app(settings.with_(access_log=False), AccessLog(out))
    client = await aiohttp_client(app, headers=PAGE)
    assert (await client.get("/api/campaigns/nope")).status == 404
    app[ACCESS_LOG].flush()
    assert out.getvalue() == b""


async def test_access_lines_of_a_burst_are_written_together(
    aiohttp_client,  # type: ignore[no-untyped-def]
    settings: Settings,
) -> None:
    """Many requests in one loop turn make one write, and none is lost at shutdown."""

    class CountingBuffer(io.BytesIO):
        writes = 0

        def write(self, data: bytes) -> int:  # type: ignore[override]
            CountingBuffer.writes += 1
            return super().write(data)

    out = CountingBuffer()
    app = create_app(settings, AccessLog(out))
    client = await aiohttp_client(app, headers=PAGE)
    await asyncio.gather(*(client.get("/api/campaigns/nope") for _ in range(200)))
    await client.close()  # app cleanup flushes what is still queued
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 200
    assert all(orjson.loads(line)["status"] == 404 for line in lines)
    assert CountingBuffer.writes < 200


def test_drain_delay_must_fit_in_shutdown_timeout() -> None:
    env = {
        "REDIS_URL": "redis://x",
        "DATABASE_URL": "postgresql://x",
        "ADMIN_TOKEN": "a" * 16,
        "SHUTDOWN_TIMEOUT_S": "5",
    }
    assert Settings.from_env({**env, "DRAIN_DELAY_S": "2.5"}).drain_delay_s == 2.5
    with pytest.raises(SettingsError, match="DRAIN_DELAY_S"):
        Settings.from_env({**env, "DRAIN_DELAY_S": "5"})
    with pytest.raises(SettingsError, match="DRAIN_DELAY_S"):
        Settings.from_env({**env, "DRAIN_DELAY_S": "soon"})


SURE_PRIZE: dict[str, object] = {
    "kind": "lottery",
    "name": "必中",
    "tiers": [{"name": "金元宝", "stock": 1, "weight": 1, "value_fen": 88_800}],
    "no_prize_weight": 0,
    "quota_total": 2,
}


async def _sure_prize(client: TestClient) -> str:
    resp = await client.post("/api/admin/campaigns", json=SURE_PRIZE, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def test_metrics_count_draw_outcomes(client: TestClient) -> None:
    cid = await _sure_prize(client)
    first, second = await asyncio.gather(login(client, "dr1"), login(client, "dr2"))
    client.session.cookie_jar.clear()
    answers = []
    for token in (first, first, first, second):
        resp = await client.post(f"/api/campaigns/{cid}/draw", cookies={"hb_session": token})
        answers.append((resp.status, (await resp.json()).get("result")))
    # The one prize first, then the stock is out (nothing else to win), then the quota.
    assert answers == [(200, "prize"), (200, "no_prize"), (429, None), (200, "no_prize")]

    samples = await scrape(client)
    draws = {k[1][0][1]: v for k, v in samples.items() if k[0] == "hongbao_draws_total"}
    assert draws == {"prize": 1, "no_prize": 2, "quota_exhausted": 1}


async def _gauge_reaches(client: TestClient, value: float, within_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while (await scrape(client))[("hongbao_ledger_lag", ())] != value:
        assert asyncio.get_running_loop().time() < deadline, f"ledger lag never {value}"
        await asyncio.sleep(0.1)


async def test_ledger_lag_gauge_follows_the_streams(
    aiohttp_client,
    settings: Settings,
    redis: Redis,  # type: ignore[no-untyped-def]
) -> None:
    app = create_app(settings.with_(ledger=MANUAL))
    client = await aiohttp_client(app, headers=PAGE)
    cid = await _sure_prize(client)
    campaign = await create_campaign(client, total_fen=1_000, count=10)
    tokens = await asyncio.gather(*(login(client, f"lag{i}") for i in range(4)))
    client.session.cookie_jar.clear()
    for token in tokens:
        for path in (f"/api/campaigns/{cid}/draw", f"/api/campaigns/{campaign['id']}/grab"):
            resp = await client.post(path, cookies={"hb_session": token})
            assert resp.status == 200
    # 4 draws + 4 grabs settled, none drained: the gauge sums both campaigns' streams.
    await _gauge_reaches(client, 8)

    drainer = Drainer(app[REDIS], app[PG], MANUAL, "metrics-test")
    while await ledger_lag(app[REDIS]):
        await drainer.step()
    await _gauge_reaches(client, 0)
    assert ("hongbao_redis_errors_total", ()) in await scrape(client)


async def test_background_tasks_count_redis_errors(settings: Settings) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    pool = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=1)
    seen_by_drainer, seen_by_watcher = Metrics(), Metrics()
    drainer = Drainer(dead, pool, FAST, "errors-test", metrics=seen_by_drainer)
    stop_watching = asyncio.Event()
    draining = asyncio.create_task(drainer.run())
    watching = asyncio.create_task(watch_lag(dead, seen_by_watcher, stop_watching, 0.05))

    def errors(metrics: Metrics) -> float:
        return metrics.registry.get_sample_value("hongbao_redis_errors_total") or 0

    try:
        deadline = asyncio.get_running_loop().time() + 10
        while errors(seen_by_drainer) < 2 or errors(seen_by_watcher) < 2:
            assert asyncio.get_running_loop().time() < deadline, "Redis errors not counted"
            await asyncio.sleep(0.05)
    finally:
        drainer.stop()
        await stop_loop(watching, stop_watching)
        await draining
        await pool.close()
        await dead.aclose()


async def test_the_lag_sampler_stops_whenever_shutdown_comes(redis_url: str, redis: Redis) -> None:
    # Cancelled at each of its first suspension points in turn; on Python 3.11 some of
    # them lose the cancellation inside redis-py, so only the stop event ends the loop.
    await redis.sadd(CAMPAIGNS_SET, "lagging")
    sampler = Redis.from_url(redis_url)
    try:
        for turns in range(12):
            stop = asyncio.Event()
            watching = asyncio.create_task(watch_lag(sampler, Metrics(), stop, 0.01))
            for _ in range(turns):
                await asyncio.sleep(0)
            stopping = asyncio.create_task(stop_loop(watching, stop))
            done, _ = await asyncio.wait({stopping}, timeout=10)
            stop.set()  # if it failed, let the sampler end before the test does
            assert stopping in done, f"the sampler ran on after a stop {turns} turns in"
            await stopping
    finally:
        await sampler.aclose()


class _Writes(io.BytesIO):
    """A stream that counts its write calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


async def test_access_lines_are_written_in_batches() -> None:
    out = _Writes()
    log = AccessLog(out)
    for i in range(10):
        log.emit({"n": i})
    assert out.writes == 0
    await asyncio.sleep(FLUSH_AFTER_S * 2)
    assert out.writes == 1
    assert [orjson.loads(line)["n"] for line in out.getvalue().splitlines()] == list(range(10))
    for i in range(FLUSH_LINES):
        log.emit({"n": i})
    assert out.writes == 2  # a full batch goes at once
    log.emit({"n": "last"})
    log.flush()  # shutdown
    assert out.writes == 3
    assert len(out.getvalue().splitlines()) == 10 + FLUSH_LINES + 1


LOG_KEYS = {"ts", "level", "pid", "request_id"}


async def test_every_line_a_worker_process_writes_is_json_with_ts_level_pid_and_request_id(
    tmp_path: Path, database_url: str, clean: None, private_redis_server: EmbeddedRedis
) -> None:
    """A real worker's stdout and stderr, start to stop, through a Redis outage: every
    line is one JSON object; application lines logged during a request carry its id."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": private_redis_server.url,
        "DATABASE_URL": database_url,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DEV_LOGIN": "1",
        "INSECURE_COOKIES": "1",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DRAIN_DELAY_S": "0.2",
        "SHUTDOWN_TIMEOUT_S": "5",
    }
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "worker"], env=env, stdout=stdout, stderr=stderr
        )
    started = time.time()
    try:
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}",
            headers=PAGE,
            timeout=aiohttp.ClientTimeout(total=10),
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies from 127.0.0.1
        ) as http:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, err.read_text()
                try:
                    if (await http.get("/readyz")).status == 200:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "worker never ready"
                await asyncio.sleep(0.1)
            resp = await http.post(
                "/api/admin/campaigns",
                json={"kind": "red_packet", "name": "日志", "total_fen": 100, "count": 1},
                headers=ADMIN,
            )
            assert resp.status == 201, await resp.text()
            cid = (await resp.json())["id"]
            assert (await http.post("/auth/dev-login", json={"openid": "logs-1"})).status == 200
            grab = f"/api/campaigns/{cid}/grab"
            won = await http.post(grab, headers={"X-Request-ID": "req-won"})
            assert (await won.json())["result"] == "won"
            assert (await http.get("/no/such/page")).status == 404
            private_redis_server.stop()
            down = await http.post(grab, headers={"X-Request-ID": "req-redis-down"})
            assert down.status == 503
            assert (await down.json())["error"] == "unavailable"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, err.read_text()[-2000:]

    lines = [
        (name, line)
        for name, path in (("stdout", out), ("stderr", err))
        for line in path.read_text().splitlines()
    ]
    entries = []
    for name, line in lines:
        entry = orjson.loads(line)  # raises on any line that is not JSON
        assert isinstance(entry, dict), line
        assert entry.keys() >= LOG_KEYS, (name, line)
        assert entry["pid"] == proc.pid, line
        assert entry["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, line
        assert started - 1 <= entry["ts"] <= time.time(), line
        entries.append(entry)
    access = [e for e in entries if "route" in e]
    app_lines = [e for e in entries if "route" not in e]
    assert [
        (e["request_id"], e["status"], e["level"])
        for e in access
        if e["route"] == grab.replace(cid, "{id}")
    ] == [
        ("req-won", 200, "INFO"),
        ("req-redis-down", 503, "ERROR"),
    ]
    assert {"route", "method", "status", "duration_ms", "user"} <= access[0].keys()
    # Start-up and shutdown lines belong to no request; the outage warning to its request.
    messages = {e["message"]: e for e in app_lines}
    assert any(m.startswith("worker ready on") for m in messages), messages
    assert messages["stopped cleanly"]["request_id"] is None
    (outage,) = [e for e in app_lines if e["message"].startswith("redis unavailable on POST")]
    assert (outage["request_id"], outage["level"], outage["logger"]) == (
        "req-redis-down",
        "WARNING",
        "hongbao.errors",
    )
