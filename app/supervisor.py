"""The one-command local run: embedded services when none are configured, then workers.

Ctrl-C (or SIGTERM) stops the workers first, then whatever services it started.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.embedded import EmbeddedPostgres, EmbeddedRedis
from app.localrun import demo_page, start_fake_wechat

DEFAULT_DATA_DIR = Path(".data")
EMBEDDED_REDIS_PORT = 16379
EMBEDDED_PG_PORT = 15432
EMBEDDED_REDIS_URL = f"redis://127.0.0.1:{EMBEDDED_REDIS_PORT}/0"
# Redis's own appendfsync values; see the README's durability paragraph.
APPENDFSYNC_POLICIES = ("always", "everysec", "no")


def _admin_token(data_dir: Path) -> str:
    """ADMIN_TOKEN from the environment, else one generated once and kept in data_dir."""
    if os.environ.get("ADMIN_TOKEN"):
        return os.environ["ADMIN_TOKEN"]
    path = data_dir / "admin-token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def serve(workers: int, port: int, data_dir: Path = DEFAULT_DATA_DIR) -> int:
    """Run the service until interrupted; return the exit code."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    services: list[EmbeddedRedis | EmbeddedPostgres] = []
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if not env.get("REDIS_URL"):
            redis_port = int(env.get("EMBEDDED_REDIS_PORT", EMBEDDED_REDIS_PORT))
            fsync = env.get("REDIS_APPENDFSYNC") or "everysec"
            if fsync not in APPENDFSYNC_POLICIES:
                print(f"REDIS_APPENDFSYNC must be one of {APPENDFSYNC_POLICIES}", file=sys.stderr)
                return 2
            redis = EmbeddedRedis(data_dir / "redis", redis_port, fsync).start()
            services.append(redis)
            env["REDIS_URL"] = redis.url
            print(f"embedded Redis (AOF appendfsync {fsync}) at {redis.url}", flush=True)
        if not env.get("DATABASE_URL"):
            pg_port = int(env.get("EMBEDDED_PG_PORT", EMBEDDED_PG_PORT))
            pg = EmbeddedPostgres(data_dir / "postgres", pg_port).start()
            services.append(pg)
            env["DATABASE_URL"] = pg.url
            print(f"embedded PostgreSQL at {pg.url}", flush=True)
        env["ADMIN_TOKEN"] = _admin_token(data_dir)
        # A local run is plain HTTP on loopback, with dev-login for quick trials.
        env.setdefault("INSECURE_COOKIES", "1")
        env.setdefault("DEV_LOGIN", "1")
        env["PORT"] = str(port)
        fake = start_fake_wechat(env)
        if fake is not None:
            procs.append(fake)
            print(f"fake WeChat (web authorization) at {env['WECHAT_API_BASE']}", flush=True)
        for _ in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "app", "worker"], env=env))
        print(f"hongbao: {workers} worker(s) on http://127.0.0.1:{port}/", flush=True)
        print(f"admin token in {data_dir / 'admin-token'} (or $ADMIN_TOKEN)", flush=True)
        page = demo_page(f"http://127.0.0.1:{port}", env["ADMIN_TOKEN"], data_dir)
        print(f"open the H5 page (375x667 is the phone size): {page}", flush=True)
        print("Ctrl-C stops everything started here.", flush=True)
        while not stopping:
            if any(p.poll() is not None for p in procs):
                print("a worker exited; stopping", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for service in reversed(services):
            service.stop()
        print("hongbao: stopped", flush=True)
