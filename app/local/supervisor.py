"""The one-command local run: embedded services when none are configured, then workers.

With ``haproxy`` on PATH, each worker listens on its own loopback port and HAProxy
(haproxy/haproxy.cfg) fronts them on the public port, as in production; without it,
the workers share the public port with SO_REUSEPORT.

A worker (or the fake WeChat) that dies is restarted with back-off (``Keeper``);
Ctrl-C (or SIGTERM) stops the workers first (each drains), then HAProxy, then whatever
services it started.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.local.cluster import EmbeddedCluster
from app.local.demo import demo_page, start_fake_wechat, wait_ready
from app.local.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, port_busy
from app.local.fakewechatpay import start_fake_wechatpay
from app.local.haproxy import LOCAL_CONFIG, EdgeProxy, edge_env, haproxy_binary, render_local_config
from app.settings import SettingsError, Stores

DEFAULT_DATA_DIR = Path(".data")
# A child that dies is started again after a back-off: RESTART_FIRST_S, doubling up to
# RESTART_MAX_S; one that ran STABLE_AFTER_S before dying starts from the shortest again.
RESTART_FIRST_S = 0.2
RESTART_MAX_S = 10.0
STABLE_AFTER_S = 30.0
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


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _busy_port(port: int, stores: Stores) -> str | None:
    """One line naming a port this run needs that something else already holds."""
    wanted = [(port, "--port")]
    if not stores.redis_given:
        wanted.append((stores.embedded_redis_port, "EMBEDDED_REDIS_PORT"))
    if not stores.database_given:
        wanted.append((stores.embedded_pg_port, "EMBEDDED_PG_PORT"))
    for number, setting in wanted:
        if port_busy(number):
            return (
                f"hongbao: port {number} is already in use (another ./hb serve?); "
                f"stop it or choose another with {setting}"
            )
    return None


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    failures: int = 0
    due: float | None = None


class Keeper:
    """The children of a local run, each restarted with back-off when it dies.

    One crashed worker never stops the service: HAProxy's health checks take it out of
    rotation, the others serve, and it comes back on the same port. ``procs`` is the
    supervisor's list of running children, kept current across restarts.
    """

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self._procs = procs
        self._children: list[_Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """Start ``argv`` and keep it running."""
        self.adopt(name, subprocess.Popen(argv, env=env), env)

    def adopt(self, name: str, proc: subprocess.Popen[bytes], env: dict[str, str]) -> None:
        """Keep an already started child running (restarted with the same argv and env)."""
        self._children.append(_Child(name, proc, env))
        self._procs.append(proc)

    def check(self) -> None:
        """Notice children that died; restart those whose back-off is over."""
        now = time.monotonic()
        for child in self._children:
            if child.due is None:
                code = child.proc.poll()
                if code is None:
                    continue
                if now - child.started >= STABLE_AFTER_S:
                    child.failures = 0
                delay = min(RESTART_FIRST_S * 2**child.failures, RESTART_MAX_S)
                child.failures += 1
                child.due = now + delay
                print(
                    f"{child.name} (pid {child.proc.pid}) exited with code {code}; "
                    f"restarting in {delay:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
            elif now >= child.due:
                old = child.proc
                child.proc = subprocess.Popen(old.args, env=child.env)
                self._procs[self._procs.index(old)] = child.proc
                child.started, child.due = now, None
                print(f"{child.name} restarted (pid {child.proc.pid})", file=sys.stderr, flush=True)


def start_edge(data_dir: Path, public_port: int, worker_ports: list[int]) -> EdgeProxy:
    """Render haproxy.cfg for ``worker_ports`` into ``data_dir`` and start HAProxy."""
    config = data_dir / "haproxy.cfg"
    config.write_text(render_local_config(LOCAL_CONFIG.read_text(), worker_ports))
    env = edge_env(public_port, free_port(), data_dir.resolve() / "haproxy.sock")
    return EdgeProxy(config, public_port, env).start(data_dir / "haproxy.log")


def serve(
    workers: int,
    port: int,
    data_dir: Path = DEFAULT_DATA_DIR,
    use_haproxy: bool = True,
    redis_cluster: int = 0,
) -> int:
    """Run the service until interrupted; return the exit code. ``redis_cluster`` N > 0:
    on a local Redis Cluster of N masters and N replicas instead of one Redis."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    try:
        stores = Stores.from_env(env)
    except SettingsError as exc:
        print(f"hongbao: {exc}", file=sys.stderr)
        return 2
    busy = _busy_port(port, stores)
    if busy:
        print(busy, file=sys.stderr)
        return 2
    services: list[EmbeddedRedis | EmbeddedPostgres | EmbeddedCluster] = []
    procs: list[subprocess.Popen[bytes]] = []
    keeper = Keeper(procs)
    edge: EdgeProxy | None = None
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if redis_cluster:
            if stores.redis_given:
                print(
                    "hongbao: --redis-cluster starts its own cluster: unset REDIS_URL",
                    file=sys.stderr,
                )
                return 2
            fsync = env.get("REDIS_APPENDFSYNC") or "everysec"
            cluster = EmbeddedCluster(
                data_dir / "redis-cluster", masters=redis_cluster, appendfsync=fsync
            )
            services.append(cluster)
            cluster.start()
            env["REDIS_URL"], env["REDIS_CLUSTER"] = cluster.url, "1"
            print(
                f"local Redis Cluster: {redis_cluster} masters + {redis_cluster} replicas "
                f"on ports {cluster.ports} (seed {cluster.url})",
                flush=True,
            )
        elif not stores.redis_given:
            fsync = env.get("REDIS_APPENDFSYNC") or "everysec"
            if fsync not in APPENDFSYNC_POLICIES:
                print(f"REDIS_APPENDFSYNC must be one of {APPENDFSYNC_POLICIES}", file=sys.stderr)
                return 2
            redis = EmbeddedRedis(data_dir / "redis", stores.embedded_redis_port, fsync).start()
            services.append(redis)
            env["REDIS_URL"] = redis.url
            print(f"embedded Redis (AOF appendfsync {fsync}) at {redis.url}", flush=True)
        if not stores.database_given:
            pg = EmbeddedPostgres(data_dir / "postgres", stores.embedded_pg_port).start()
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
            keeper.adopt("fake WeChat", fake, env)
            print(f"fake WeChat (web authorization) at {env['WECHAT_API_BASE']}", flush=True)
        pay = start_fake_wechatpay(env, data_dir)
        if pay is not None:
            keeper.adopt("fake WeChat Pay", pay, env)
            print(f"fake WeChat Pay (merchant transfer) at {env['WECHATPAY_API_BASE']}", flush=True)
        if use_haproxy and haproxy_binary():
            worker_ports = _distinct_free_ports(workers)
            for worker_port in worker_ports:
                worker_env = {**env, "HOST": "127.0.0.1", "PORT": str(worker_port)}
                keeper.start(
                    f"worker on :{worker_port}", [sys.executable, "-m", "app", "worker"], worker_env
                )
            edge = start_edge(data_dir, port, worker_ports)
            stats = edge.env["HB_STATS_BIND"]
            print(f"HAProxy on :{port} -> workers on {worker_ports}", flush=True)
            print(
                f"HAProxy stats: http://{stats}/stats, metrics: http://{stats}/metrics", flush=True
            )
        else:
            for n in range(workers):
                keeper.start(f"worker {n + 1}", [sys.executable, "-m", "app", "worker"], env)
            print("no HAProxy (not on PATH, or --no-haproxy): workers share the port", flush=True)
            worker_ports = []
        # The ready line comes once every worker (and the public port) answers /readyz.
        urls = [f"http://127.0.0.1:{p}/readyz" for p in [*worker_ports, port]]
        wait_ready(urls, procs)
        # Payouts start once the notification URL (the public port) answers.
        keeper.start("payout worker", [sys.executable, "-m", "app", "payout"], env)
        print(f"hongbao: {workers} worker(s) on http://127.0.0.1:{port}/", flush=True)
        print(f"admin token in {data_dir / 'admin-token'} (or $ADMIN_TOKEN)", flush=True)
        page = demo_page(
            f"http://127.0.0.1:{port}", env["ADMIN_TOKEN"], data_dir, shards=redis_cluster or 1
        )
        print(f"open the H5 page (375x667 is the phone size): {page}", flush=True)
        print("Ctrl-C stops everything started here.", flush=True)
        while not stopping:
            keeper.check()
            time.sleep(0.1)
        return 0
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        # A service that cannot start (a missing binary, a port taken meanwhile): one line.
        print(f"hongbao: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        return 2
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if edge is not None:
            edge.stop()
        for service in reversed(services):
            service.stop()
        if services or procs or edge is not None:
            print("hongbao: stopped", flush=True)
