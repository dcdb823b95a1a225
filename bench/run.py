"""One-command benchmark of the real stack: ``./hb bench``.

Starts its own Redis (AOF everysec) and PostgreSQL, N app workers and N floor workers
(bench/floor.py) behind one HAProxy, mints player sessions, and drives each path with
wrk (bench/wrk/players.lua: every request a different player). It prints req/s, p50 and
p99 for each path with its ratio to the floor measured in the same run, Redis script
calls per grab (INFO commandstats), and the cost of appendfsync always.
Everything runs on loopback, bounded in time, and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import psutil
from redis.asyncio import Redis

from app.background.lag import ledger_lag
from app.identity.sessions import SessionStore
from app.local.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "bench-admin-token-0123456789"
DRAIN_NICE = 19

HAPROXY_CFG = """
global
    maxconn 4000
    nbthread 1
defaults
    mode http
    option http-keep-alive
    # As in haproxy/haproxy.cfg: every request reaches a worker with an X-Request-ID.
    unique-id-format %[uuid()]
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout queue 5s
frontend app
    bind 127.0.0.1:{app_port}
    http-request set-header X-Request-ID %[unique-id] unless {{ req.hdr(X-Request-ID) -m found }}
    default_backend workers
frontend floor
    bind 127.0.0.1:{floor_port}
    http-request set-header X-Request-ID %[unique-id] unless {{ req.hdr(X-Request-ID) -m found }}
    default_backend floors
backend workers
    balance leastconn
    option httpchk GET /readyz
{app_servers}
backend floors
    balance leastconn
    option httpchk GET /readyz
{floor_servers}
"""


@dataclass
class Result:
    """One wrk run."""

    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    # CPU seconds per component during the run (the load generator included).
    cpu_s: dict[str, float] = field(default_factory=dict)


GRAB = "grab (won)"
SOLD = "sold out"
ENDED = "ended (409)"
EARLY = "not started (409)"
ALWAYS = "grab (won), appendfsync always"
DRAW = "lottery draw"
PATHS = ("grab", "sold-out", "ended", "not-started", "draw", "always")


def median_rps(pairs: list[tuple[Result, Result]]) -> float:
    """Median req/s of the path runs of ``pairs``."""
    return statistics.median(p.rps for _, p in pairs)


def summary(name: str, runs: list[Result], floors: list[Result] | None) -> str:
    """One table row: medians over rounds; the ratio is the median of paired ratios."""
    ratio = (
        "—"
        if floors is None
        else f"{statistics.median(r.rps / f.rps for r, f in zip(runs, floors, strict=True)):.2f}"
    )
    return (
        f"| {name} | {statistics.median(r.rps for r in runs):,.0f} "
        f"| {statistics.median(r.p50_ms for r in runs):.2f} "
        f"| {statistics.median(r.p99_ms for r in runs):.2f} | {ratio} "
        f"| {sum(r.errors for r in runs)} |"
    )


CPU_COLUMNS = ("app", "floor", "drainer", "HAProxy", "Redis", "PostgreSQL", "wrk")


def cpu_per_request(runs: list[Result]) -> list[float]:
    """Mean CPU µs per request of each component (CPU_COLUMNS) over ``runs``."""
    requests = sum(r.requests for r in runs) or 1
    return [sum(r.cpu_s.get(c, 0.0) for r in runs) * 1e6 / requests for c in CPU_COLUMNS]


def cpu_row(name: str, runs: list[Result], floors: list[Result] | None) -> str:
    """CPU µs per request by component, the total, and the floor's total over it: the
    throughput ratio the machine allows when CPU is what runs out (less noisy than
    req/s of 5-second runs on a shared machine)."""
    per = cpu_per_request(runs)
    ratio = "—" if floors is None else f"{sum(cpu_per_request(floors)) / sum(per):.2f}"
    cells = " | ".join(f"{max(v, 0.0):.0f}" for v in per)
    return f"| {name} | {cells} | {sum(per):.0f} | {ratio} |"


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


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by ``pids`` and all their children."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


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


def wrk(name: str, url: str, sessions: Path, seconds: int, connections: int, origin: str) -> Result:
    """Run wrk against ``url`` and parse the BENCH line of players.lua."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(ROOT / "bench/wrk/players.lua"),
            url,
            "--",
            str(sessions),
            "POST",
            origin,
            "2",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    line = next(li for li in out.splitlines() if li.startswith("BENCH "))
    data = json.loads(line[len("BENCH ") :])
    errors = sum(
        data[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return Result(
        name=name,
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        requests=data["requests"],
        cpu_s={"wrk": wrk_cpu},
    )


async def create(http: aiohttp.ClientSession, base: str, **fields: object) -> str:
    """Create a campaign (a red packet unless ``kind`` says otherwise); return its id."""
    body = {"kind": "red_packet", "name": "bench", **fields}
    async with http.post(
        f"{base}/api/admin/campaigns",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as resp:
        data = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"create failed: {data}")
        return str(data["id"])


async def create_lottery(http: aiohttp.ClientSession, base: str) -> str:
    """A lottery every bench player may draw from once, with ample stock."""
    return await create(
        http,
        base,
        kind="lottery",
        name="bench 财神",
        tiers=[
            {"name": "8.88元", "stock": 1_000_000, "weight": 10, "value_fen": 888},
            {"name": "福袋", "stock": 1_000_000, "weight": 30, "value_fen": None},
        ],
        no_prize_weight=60,
        quota_total=1,
    )


async def catch_up(redis: Redis, timeout_s: float = 300) -> tuple[int, float]:
    """The ledger lag now, and how long the drainers take to bring it to zero."""
    lag = await ledger_lag(redis)
    start = time.monotonic()
    while await ledger_lag(redis):
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the ledger did not catch up within {timeout_s}s")
        await asyncio.sleep(0.05)
    return lag, time.monotonic() - start


async def ledger_matches(redis: Redis, database_url: str, campaign_ids: list[str]) -> bool:
    """Whether PostgreSQL holds exactly the grants Redis counted, campaign by campaign."""
    conn = await asyncpg.connect(database_url)
    try:
        for cid in campaign_ids:
            won = await redis.hmget(f"hb:{{{cid}}}:meta", "won_count", "won_fen")
            count, fen = await conn.fetchrow(
                "SELECT count(*), coalesce(sum(amount_fen), 0) FROM grabs WHERE campaign_id = $1",
                cid,
            ) or (0, 0)
            if (int(won[0] or 0), int(won[1] or 0)) != (count, fen):
                return False
        return True
    finally:
        await conn.close()


async def script_calls(redis: Redis) -> int:
    """EVALSHA + EVAL calls so far."""
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


async def bench(args: argparse.Namespace) -> str:
    """Run every scenario; return the markdown report."""
    work = Path(tempfile.mkdtemp(prefix="hongbao-bench-"))
    redis_srv = EmbeddedRedis(work / "redis", free_port()).start()
    pg_srv = EmbeddedPostgres(work / "pg", free_port()).start()
    app_ports = [free_port() for _ in range(args.workers)]
    floor_ports = [free_port() for _ in range(args.workers)]
    app_port, floor_port = free_port(), free_port()
    redis = Redis.from_url(redis_srv.url)
    try:
        with processes() as procs:
            env = dict(
                os.environ,
                REDIS_URL=redis_srv.url,
                DATABASE_URL=pg_srv.url,
                ADMIN_TOKEN=ADMIN_TOKEN,
                INSECURE_COOKIES="1",
                PUBLIC_BASE_URL=f"http://127.0.0.1:{app_port}",
                LEDGER_DRAIN_IN_WORKER="1" if args.drain == "worker" else "0",
            )
            # Access logs go to files, as a log collector would take them.
            app_procs = [
                spawn(
                    [sys.executable, "-m", "app", "worker"],
                    {**env, "PORT": str(port)},
                    work / f"worker-{port}.log",
                )
                for port in app_ports
            ]
            floor_procs = [
                spawn([sys.executable, str(ROOT / "bench/floor.py")], {**env, "PORT": str(port)})
                for port in floor_ports
            ]
            # One drainer process at lower CPU priority: at the peak the workers get the
            # CPU and the ledger lag grows; it is drained between runs.
            drain_procs = (
                [
                    spawn(
                        [sys.executable, "-m", "app", "drain"],
                        {**env, "LEDGER_DRAIN_NICE": str(DRAIN_NICE)},
                        work / "drainer.log",
                    )
                ]
                if args.drain == "process"
                else []
            )
            procs += [*app_procs, *floor_procs, *drain_procs]
            cfg = work / "haproxy.cfg"
            cfg.write_text(
                HAPROXY_CFG.format(
                    app_port=app_port,
                    floor_port=floor_port,
                    app_servers="\n".join(
                        f"    server w{i} 127.0.0.1:{p} check inter 1s maxconn 256"
                        for i, p in enumerate(app_ports)
                    ),
                    floor_servers="\n".join(
                        f"    server f{i} 127.0.0.1:{p} check inter 1s maxconn 256"
                        for i, p in enumerate(floor_ports)
                    ),
                )
            )
            haproxy = subprocess.Popen(["haproxy", "-f", str(cfg)])
            procs.append(haproxy)
            for port in [*app_ports, *floor_ports]:
                await wait_ready(f"http://127.0.0.1:{port}/readyz")
            base = f"http://127.0.0.1:{app_port}"
            await wait_ready(f"{base}/readyz")
            await wait_ready(f"http://127.0.0.1:{floor_port}/readyz")

            store = SessionStore(redis, 3600)
            openids = [f"bench-{i:07d}" for i in range(args.players)]
            tokens = await store.mint(openids)
            sessions = work / "sessions.tsv"
            pairs = zip(openids, tokens, strict=True)
            sessions.write_text("".join(f"{o}\t{t}\n" for o, t in pairs))

            rounds = range(args.rounds)
            async with aiohttp.ClientSession() as http:
                # A fresh campaign per round, so every request of a grab run is a first grab.
                grab_ids = [
                    await create(http, base, total_fen=args.players * 100, count=args.players)
                    for _ in rounds
                ]
                always_ids = [
                    await create(http, base, total_fen=args.players * 100, count=args.players)
                    for _ in rounds
                ]
                sold_id = await create(http, base, total_fen=100, count=1)
                ended_id = await create(
                    http,
                    base,
                    total_fen=100,
                    count=1,
                    starts_at="2001-01-01T00:00:00Z",
                    ends_at="2001-01-02T00:00:00Z",
                )
                # One lottery per round: quota_total 1, so every draw of a run is a first one.
                lottery_ids = [await create_lottery(http, base) for _ in rounds]
                early_id = await create(
                    http, base, total_fen=100, count=1, starts_at="2999-01-01T00:00:00Z"
                )
                async with http.post(
                    f"{base}/api/campaigns/{sold_id}/grab",
                    cookies={"hb_session": tokens[-1]},
                    headers={"Origin": base, "X-Requested-With": "hongbao"},
                ) as resp:
                    assert (await resp.json())["result"] == "won"

            floor_url = f"http://127.0.0.1:{floor_port}/api/campaigns/x/grab"

            components = {
                "app": [p.pid for p in app_procs],
                "floor": [p.pid for p in floor_procs],
                "drainer": [p.pid for p in drain_procs],
                "HAProxy": [haproxy.pid],
                "Redis": [redis_srv.proc.pid] if redis_srv.proc else [],
                "PostgreSQL": [pg_srv.proc.pid] if pg_srv.proc else [],
            }

            def run(name: str, url: str) -> Result:
                print(f"  {name} ...", file=sys.stderr, flush=True)
                before = {c: tree_cpu_s(pids) for c, pids in components.items()}
                result = wrk(name, url, sessions, args.seconds, args.connections, base)
                for c, pids in components.items():
                    result.cpu_s[c] = tree_cpu_s(pids) - before[c]
                return result

            def paired(name: str, url: str) -> tuple[Result, Result]:
                """The path and, right before it, the floor: the machine is shared."""
                return run("floor", floor_url), run(name, url)

            run("warm-up", floor_url)
            pairs_by_path: dict[str, list[tuple[Result, Result]]] = {}
            grab_calls = grab_requests = won = 0
            paths = set(args.paths)
            catch_ups: dict[str, list[tuple[int, float]]] = {}

            async def settled(name: str, pair: tuple[Result, Result]) -> None:
                """Record a run that grants or draws, once the ledger has caught up with it,
                so that no run pays for the previous one's backlog."""
                catch_ups.setdefault(name, []).append(await catch_up(redis))
                pairs_by_path.setdefault(name, []).append(pair)

            for r in rounds:
                if "grab" in paths:
                    before = await script_calls(redis)
                    pair = paired(GRAB, f"{base}/api/campaigns/{grab_ids[r]}/grab")
                    grab_calls += await script_calls(redis) - before
                    grab_requests += pair[1].requests
                    won += int(await redis.hget(f"hb:{{{grab_ids[r]}}}:meta", "won_count") or 0)
                    await settled(GRAB, pair)
                for path, name, cid in (
                    ("sold-out", SOLD, sold_id),
                    ("ended", ENDED, ended_id),
                    ("not-started", EARLY, early_id),
                ):
                    if path in paths:
                        url = f"{base}/api/campaigns/{cid}/grab"
                        pairs_by_path.setdefault(name, []).append(paired(name, url))
                if "draw" in paths:
                    url = f"{base}/api/campaigns/{lottery_ids[r]}/draw"
                    await settled(DRAW, paired(DRAW, url))
                if "always" in paths:
                    await redis.config_set("appendfsync", "always")
                    pair = paired(ALWAYS, f"{base}/api/campaigns/{always_ids[r]}/grab")
                    await redis.config_set("appendfsync", "everysec")
                    await settled(ALWAYS, pair)
            ledger_ok = await ledger_matches(redis, pg_srv.url, [*grab_ids, *always_ids])
    finally:
        await redis.aclose()
        pg_srv.stop()
        redis_srv.stop()
        shutil.rmtree(work, ignore_errors=True)

    floors = [f for pairs in pairs_by_path.values() for f, _ in pairs]
    lines = [
        f"{args.workers} app workers and {args.workers} floor workers behind one HAProxy; "
        f"wrk -t2 -c{args.connections} -d{args.seconds}s per run, {args.rounds} rounds; "
        f"{args.players:,} players; {os.cpu_count()} cores shared by everything",
        "",
        "| path | req/s | p50 ms | p99 ms | ratio to floor | errors |",
        "|---|---:|---:|---:|---:|---:|",
        summary("floor (minimal aiohttp handler)", floors, None),
        *(
            summary(name, [p for _, p in pairs], [f for f, _ in pairs])
            for name, pairs in pairs_by_path.items()
        ),
        "",
    ]
    if GRAB in pairs_by_path:
        lines.append(
            f"grab runs: {grab_requests:,} requests, {won:,} envelopes won, "
            f"{grab_calls:,} script calls: {grab_calls / max(grab_requests, 1):.3f} "
            "script calls per grab"
        )
    if GRAB in pairs_by_path and ALWAYS in pairs_by_path:
        ratio = median_rps(pairs_by_path[ALWAYS]) / median_rps(pairs_by_path[GRAB])
        lines.append(f"durability: appendfsync always / everysec = {ratio:.2f}")
    drainer = (
        f"one drainer process at nice {DRAIN_NICE}"
        if args.drain == "process"
        else "a drainer in each worker"
    )
    for name, caught in catch_ups.items():
        lines.append(
            f"ledger ({drainer}), {name}: at most {max(n for n, _ in caught):,} entries "
            f"not yet in PostgreSQL when a run ended, all in within "
            f"{max(t for _, t in caught):.1f} s"
        )
    if catch_ups:
        lines.append(
            "PostgreSQL grants = Redis winners for every grab campaign: "
            + ("yes" if ledger_ok else "**NO**")
        )
    lines += [
        "",
        "CPU per request in µs, by component (all rounds; the machine's CPU is the sum), and",
        "the floor's total over the path's (the ratio when CPU is what runs out):",
        "",
        "| path | " + " | ".join(CPU_COLUMNS) + " | total | CPU ratio |",
        "|---|" + "---:|" * (len(CPU_COLUMNS) + 2),
        cpu_row("floor (minimal aiohttp handler)", floors, None),
        *(
            cpu_row(name, [p for _, p in pairs], [f for f, _ in pairs])
            for name, pairs in pairs_by_path.items()
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run, print the report."""
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--players", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--drain",
        choices=("process", "worker"),
        default="process",
        help=f"ledger drainers: one process at nice {DRAIN_NICE} (default), or one per worker",
    )
    parser.add_argument(
        "--paths",
        type=lambda v: v.split(","),
        default=list(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)}",
    )
    args = parser.parse_args()
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    if shutil.which("wrk") is None or shutil.which("haproxy") is None:
        sys.exit("bench needs wrk and haproxy: apt-get install -y wrk haproxy")
    print(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
