"""The stack a bench drives, all on free loopback ports, stopped on exit.

Its own Redis (AOF everysec) and PostgreSQL, N app workers and N floor workers
(bench/floor.py), a ledger drainer, and two HAProxy processes from the production
``haproxy/haproxy.cfg`` (one in front of the app workers, one in front of the floors,
so both pay the same edge), with the rate limits lifted through its ``HB_*`` variables:
all load comes from one address and a few hundred thousand sessions. With the OpenResty
comparison, also nginx (bench/openresty.py) against the same Redis, without HAProxy.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from app.local.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from app.local.haproxy import LOCAL_CONFIG, EdgeProxy, edge_env, render_local_config
from bench.openresty import OpenResty

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "bench-admin-token-0123456789"
DRAIN_NICE = 19
# Far above any rate a bench reaches: HAProxy's limits are lifted, its work is kept.
NO_LIMIT = "1000000000"
LIFTED = ("HB_IP_RATE", "HB_SESSION_RATE", "HB_CONN_CUR", "HB_CONN_RATE")


@dataclass
class Stack:
    """A running stack: where to send load, and which processes to charge CPU to."""

    work: Path
    base: str
    floor_url: str
    redis: Redis
    database_url: str
    components: dict[str, list[int]]
    # The OpenResty comparison's nginx and the key that signs its cookies, if it runs.
    openresty: OpenResty | None = None
    cookie_key: bytes = b""


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started inside are terminated on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def spawn(args: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``args`` in the repository; output to ``log`` if given, else inherited."""
    if log is None:
        return subprocess.Popen(args, cwd=ROOT, env=env)
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_ready(url: str, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def edge(work: Path, name: str, public: int, ports: list[int], exits: ExitStack) -> EdgeProxy:
    """HAProxy from the production config on ``public``, in front of ``ports``."""
    config = work / f"haproxy-{name}.cfg"
    config.write_text(render_local_config(LOCAL_CONFIG.read_text(), ports))
    env = edge_env(public, free_port(), work / f"haproxy-{name}.sock")
    env.update({name: NO_LIMIT for name in LIFTED})
    proxy = EdgeProxy(config, public, env).start(work / f"haproxy-{name}.log")
    exits.callback(proxy.stop)
    return proxy


def app_env(redis_url: str, database_url: str, public_port: int, drain: str) -> dict[str, str]:
    """The environment of every app process."""
    return dict(
        os.environ,
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        ADMIN_TOKEN=ADMIN_TOKEN,
        INSECURE_COOKIES="1",
        PUBLIC_BASE_URL=f"http://127.0.0.1:{public_port}",
        LEDGER_DRAIN_IN_WORKER="1" if drain == "worker" else "0",
    )


@dataclass
class Processes:
    """The app workers, the floor workers and the drainer (if one runs apart)."""

    app: list[subprocess.Popen[bytes]]
    floor: list[subprocess.Popen[bytes]]
    drainer: list[subprocess.Popen[bytes]]


def start_processes(
    work: Path, env: dict[str, str], app_ports: list[int], floor_ports: list[int], drain: str
) -> Processes:
    """Start the workers on their ports, and one drainer unless they drain themselves."""
    # Access logs go to files, as a log collector would take them.
    app = [
        spawn(
            [sys.executable, "-m", "app", "worker"],
            {**env, "PORT": str(port)},
            work / f"worker-{port}.log",
        )
        for port in app_ports
    ]
    floor = [
        spawn([sys.executable, str(ROOT / "bench/floor.py")], {**env, "PORT": str(port)})
        for port in floor_ports
    ]
    # One drainer process at lower CPU priority: at the peak the workers get the
    # CPU and the ledger lag grows; it is drained between runs.
    drainer = (
        [
            spawn(
                [sys.executable, "-m", "app", "drain"],
                {**env, "LEDGER_DRAIN_NICE": str(DRAIN_NICE)},
                work / "drainer.log",
            )
        ]
        if drain == "process"
        else []
    )
    return Processes(app=app, floor=floor, drainer=drainer)


@asynccontextmanager
async def running(workers: int, drain: str, openresty: bool) -> AsyncIterator[Stack]:
    """Start the stack (``drain``: "process" or "worker"; nginx too if ``openresty``);
    stop all of it on exit."""
    work = Path(tempfile.mkdtemp(prefix="hongbao-bench-"))
    with ExitStack() as exits, processes() as procs:
        exits.callback(shutil.rmtree, work, ignore_errors=True)
        redis_srv = EmbeddedRedis(work / "redis", free_port()).start()
        exits.callback(redis_srv.stop)
        pg_srv = EmbeddedPostgres(work / "pg", free_port()).start()
        exits.callback(pg_srv.stop)
        app_ports = [free_port() for _ in range(workers)]
        floor_ports = [free_port() for _ in range(workers)]
        app_public, floor_public = free_port(), free_port()
        env = app_env(redis_srv.url, pg_srv.url, app_public, drain)
        started = start_processes(work, env, app_ports, floor_ports, drain)
        procs += [*started.app, *started.floor, *started.drainer]
        for port in [*app_ports, *floor_ports]:
            await wait_ready(f"http://127.0.0.1:{port}/readyz")
        proxies = [
            edge(work, "app", app_public, app_ports, exits),
            edge(work, "floor", floor_public, floor_ports, exits),
        ]
        base = f"http://127.0.0.1:{app_public}"
        await wait_ready(f"{base}/readyz")
        await wait_ready(f"http://127.0.0.1:{floor_public}/readyz")
        cookie_key = secrets.token_urlsafe(32).encode()
        nginx = None
        if openresty:
            nginx = OpenResty(work / "openresty", free_port(), redis_srv.url, cookie_key)
            exits.enter_context(nginx)
        redis = Redis.from_url(redis_srv.url)
        try:
            yield Stack(
                work=work,
                base=base,
                floor_url=f"http://127.0.0.1:{floor_public}/api/campaigns/x/grab",
                redis=redis,
                database_url=pg_srv.url,
                components={
                    "app": [p.pid for p in started.app],
                    "floor": [p.pid for p in started.floor],
                    "drainer": [p.pid for p in started.drainer],
                    "HAProxy": [p.proc.pid for p in proxies if p.proc],
                    "Redis": [redis_srv.proc.pid] if redis_srv.proc else [],
                    "PostgreSQL": [pg_srv.proc.pid] if pg_srv.proc else [],
                    "OpenResty": [nginx.proc.pid] if nginx and nginx.proc else [],
                },
                openresty=nginx,
                cookie_key=cookie_key,
            )
        finally:
            await redis.aclose()
