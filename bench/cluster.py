"""The grab path on a local Redis Cluster: ``./hb bench --redis-cluster N``.

Starts N masters and N replicas (app/local/cluster.py), PostgreSQL, one ledger drainer
at nice 19 and two sets of ``--workers`` app workers (``python -m app worker`` with
``REDIS_CLUSTER=1``), one set with ``REDIS_WAIT_REPLICAS=0`` and one with 1, each set
behind HAProxy from the production config (bench/stack.py's pieces). Red packets are
created through the operator API with ``"shards": K``, so every grab goes through the
workers' own routing (app/redpacket/service.py ``_grab_sharded``). Each round drives wrk
(bench/wrk/players.lua: every request a different player, so every grab wins) at a
fresh campaign of each configuration, in this order:

* K = 1: the whole campaign under one hash tag, on one master, no ``WAIT``;
* K = N: one sub-pool per master (app.store.scripts.spread_pools), no ``WAIT``;
* K = N through the workers with ``REDIS_WAIT_REPLICAS=1``.

Each node's Redis CPU (INFO cpu, user + sys) is read before the wrk run and again once
the ledger has caught up with it, so a master's figure holds everything a winning grab
costs it: the settlement script, the AOF, feeding its replica, the drainer's reads and
deletes of its streams. The report gives grabs/s, script calls per grab, each master's
share of the grabs and its CPU per grab, the spread between the masters, the replicas',
workers', HAProxy's, drainer's and PostgreSQL's CPU per grab, and the ratios of K = N to
K = 1 and of ``WAIT 1`` to none, all from the same run. At the end PostgreSQL must hold
exactly the grants the sub-pools counted.

``--settlement-only`` runs the earlier, narrower measure instead: the settlement script
alone through the worker's script line from one Python client, no HTTP (``settlement``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.crc import key_slot

from app.identity.sessions import SessionStore
from app.local.cluster import EmbeddedCluster
from app.local.embedded import EmbeddedPostgres, free_port
from app.store.client import open_redis
from app.store.scriptline import ClusterLine
from app.store.scripts import CampaignKeys, GrabCode, Scripts, spread_pools
from bench.campaigns import create
from bench.measure import catch_up, script_calls, tree_cpu_s, wrk
from bench.stack import DRAIN_NICE, app_env, edge, processes, spawn, wait_ready

# What --quick stands for, and the defaults of a full run.
QUICK = {"seconds": 2, "rounds": 1, "players": 20_000}
FULL = {"seconds": 5, "rounds": 3, "players": 100_000}
WARM_UP_S = 2
# How long each node's idle CPU is measured before the rounds.
IDLE_S = 3.0
LOAD_CHUNK = 10_000


class Config(NamedTuple):
    """One configuration a round measures."""

    shards: int
    wait: int

    @property
    def name(self) -> str:
        """As the report names it."""
        return f"K={self.shards}, WAIT {self.wait}"


@dataclass(frozen=True, slots=True)
class Run:
    """One wrk run at one fresh campaign, with what every component spent on it."""

    config: Config
    seconds: float
    requests: int
    errors: int
    p99_ms: float
    # Envelopes won, summed over the campaign's pools.
    grabs: int
    # Script calls (EVALSHA + EVAL) during the wrk run, by master port.
    calls_by_master: dict[int, int]
    # master port -> (grabs settled there, its Redis CPU seconds until the ledger caught up)
    masters: dict[int, tuple[int, float]]
    replicas_cpu_s: float
    # CPU seconds of the workers and HAProxy during the wrk run, of the drainer and
    # PostgreSQL until the ledger caught up.
    cpu_s: dict[str, float]

    @property
    def calls(self) -> int:
        """Script calls on every master during the wrk run."""
        return sum(self.calls_by_master.values())

    @property
    def ranked(self) -> list[tuple[int, float]]:
        """(grabs, CPU s) of each master, the busiest first."""
        return sorted(self.masters.values(), reverse=True)


@dataclass
class Summary:
    """The runs of one configuration, pooled over the rounds."""

    config: Config
    runs: list[Run]

    @property
    def grabs(self) -> int:
        """Grabs won over every round."""
        return sum(r.grabs for r in self.runs)

    @property
    def grabs_per_s(self) -> float:
        """Median over the rounds."""
        return statistics.median(r.grabs / r.seconds for r in self.runs)

    @property
    def p99_ms(self) -> float:
        """Median over the rounds."""
        return statistics.median(r.p99_ms for r in self.runs)

    @property
    def calls_per_grab(self) -> float:
        """Script calls per winning grab."""
        return sum(r.calls for r in self.runs) / self.grabs

    def by_rank(self) -> list[tuple[int, float]]:
        """(grabs, CPU s) of the busiest master, the next, ..., summed over the rounds."""
        ranks = [r.ranked for r in self.runs]
        return [
            (sum(rank[i][0] for rank in ranks), sum(rank[i][1] for rank in ranks))
            for i in range(len(ranks[0]))
        ]

    def per_campaign_grab_us(self) -> list[float]:
        """Each master's (busiest first) CPU µs per grab of the whole campaign: its share
        of the settlement work."""
        return [cpu * 1e6 / self.grabs for _, cpu in self.by_rank()]

    def per_settled_grab_us(self) -> list[float]:
        """CPU µs per grab settled there, of each master that settled any."""
        return [cpu * 1e6 / grabs for grabs, cpu in self.by_rank() if grabs]

    def masters_us(self) -> float:
        """Every master's CPU µs per grab, summed."""
        return sum(self.per_campaign_grab_us())

    def spread(self) -> tuple[float, float] | None:
        """Max/min between the masters of CPU per grab settled there and of grabs settled,
        if every master settled some."""
        ranked = self.by_rank()
        if any(grabs == 0 for grabs, _ in ranked):
            return None
        us = self.per_settled_grab_us()
        return max(us) / min(us), ranked[0][0] / ranked[-1][0]

    def us(self, component: str) -> float:
        """CPU µs per grab of a component."""
        if component == "replicas":
            return sum(r.replicas_cpu_s for r in self.runs) * 1e6 / self.grabs
        return sum(r.cpu_s[component] for r in self.runs) * 1e6 / self.grabs


@dataclass
class WorkerSet:
    """App workers sharing one ``REDIS_WAIT_REPLICAS``, behind their own HAProxy."""

    wait: int
    base: str
    pids: list[int]
    haproxy_pids: list[int]

    def grab_url(self, campaign_id: str) -> str:
        """The grab route of ``campaign_id`` through this set's HAProxy."""
        return f"{self.base}/api/campaigns/{campaign_id}/grab"


@dataclass
class ClusterStack:
    """Everything the bench runs against."""

    work: Path
    cluster: EmbeddedCluster
    redis: Redis
    database_url: str
    sets: dict[int, WorkerSet]
    drainer_pids: list[int]
    postgres_pids: list[int]
    # One plain connection per node, for its INFO.
    nodes: dict[int, Redis] = field(default_factory=dict)
    masters: list[int] = field(default_factory=list)
    # (first slot, last slot, master port) of every slot range.
    slots: list[tuple[int, int, int]] = field(default_factory=list)
    # CPU seconds per second each node spends doing nothing we measure (cluster bus,
    # cron, the drainer's blocked reads), subtracted from every run's figures.
    idle: dict[int, float] = field(default_factory=dict)

    def master_of(self, pool_id: str) -> int:
        """The port of the master holding ``pool_id``'s keys."""
        slot = key_slot(CampaignKeys.of(pool_id).meta.encode())
        return next(port for low, high, port in self.slots if low <= slot <= high)


@asynccontextmanager
async def running(masters: int, workers: int) -> AsyncIterator[ClusterStack]:
    """Start the cluster, PostgreSQL, the drainer and both worker sets; stop all on exit."""
    work = Path(tempfile.mkdtemp(prefix="hongbao-bench-cluster-"))
    with ExitStack() as exits, processes() as procs:
        exits.callback(shutil.rmtree, work, ignore_errors=True)
        cluster = EmbeddedCluster(work / "cluster", masters=masters).start()
        exits.callback(cluster.stop)
        pg = EmbeddedPostgres(work / "pg", free_port()).start()
        exits.callback(pg.stop)
        sets: dict[int, WorkerSet] = {}
        ready: list[str] = []
        for wait in (0, 1):
            public = free_port()
            ports = [free_port() for _ in range(workers)]
            env = {
                **app_env(cluster.url, pg.url, public, "process"),
                "REDIS_CLUSTER": "1",
                "REDIS_WAIT_REPLICAS": str(wait),
            }
            started = [
                spawn(
                    [sys.executable, "-m", "app", "worker"],
                    {**env, "PORT": str(port)},
                    work / f"worker-{port}.log",
                )
                for port in ports
            ]
            procs += started
            ready += [f"http://127.0.0.1:{port}/readyz" for port in ports]
            proxy = edge(work, f"wait{wait}", public, ports, exits)
            sets[wait] = WorkerSet(
                wait=wait,
                base=f"http://127.0.0.1:{public}",
                pids=[p.pid for p in started],
                haproxy_pids=[proxy.proc.pid] if proxy.proc else [],
            )
        drainer = spawn(
            [sys.executable, "-m", "app", "drain"],
            {
                **app_env(cluster.url, pg.url, free_port(), "process"),
                "REDIS_CLUSTER": "1",
                "LEDGER_DRAIN_NICE": str(DRAIN_NICE),
            },
            work / "drainer.log",
        )
        procs.append(drainer)
        for url in [*ready, *(f"{s.base}/readyz" for s in sets.values())]:
            await wait_ready(url)
        redis = open_redis(cluster.url, cluster=True)
        stack = ClusterStack(
            work=work,
            cluster=cluster,
            redis=redis,
            database_url=pg.url,
            sets=sets,
            drainer_pids=[drainer.pid],
            postgres_pids=[pg.proc.pid] if pg.proc else [],
        )
        for node in cluster.topology():
            stack.nodes[node.port] = Redis(host="127.0.0.1", port=node.port)
            if node.master:
                stack.masters.append(node.port)
                stack.slots += [(low, high, node.port) for low, high in node.slots]
        try:
            yield stack
        finally:
            for client in stack.nodes.values():
                await client.aclose()
            await redis.aclose()


async def node_cpu_s(stack: ClusterStack) -> dict[int, float]:
    """used_cpu_user + used_cpu_sys of every node, by port."""
    out = {}
    for port, client in stack.nodes.items():
        info = await client.info("cpu")
        out[port] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return out


async def measure_idle(stack: ClusterStack) -> None:
    """Each node's CPU per second while no grab comes in."""
    before, started = await node_cpu_s(stack), time.monotonic()
    await asyncio.sleep(IDLE_S)
    after, seconds = await node_cpu_s(stack), time.monotonic() - started
    stack.idle = {port: (after[port] - before[port]) / seconds for port in stack.nodes}


async def master_calls(stack: ClusterStack) -> dict[int, int]:
    """Script calls so far on each master."""
    return {port: await script_calls(stack.nodes[port]) for port in stack.masters}


async def mint_sessions(stack: ClusterStack, players: int) -> Path:
    """Sessions of ``players`` players, written for wrk."""
    openids = [f"bench-{i:07d}" for i in range(players)]
    tokens = await SessionStore(stack.redis, 3600).mint(openids)
    sessions = stack.work / "sessions.tsv"
    sessions.write_text("".join(f"{o}\t{t}\n" for o, t in zip(openids, tokens, strict=True)))
    return sessions


async def won_by_pool(stack: ClusterStack, campaign_id: str, shards: int) -> dict[str, int]:
    """Envelopes won in each pool of ``campaign_id``."""
    pools = spread_pools(campaign_id, shards)
    won = [await stack.redis.hget(CampaignKeys.of(p).meta, "won_count") for p in pools]
    return {p: int(w or 0) for p, w in zip(pools, won, strict=True)}


async def one_run(
    stack: ClusterStack, config: Config, campaign_id: str, sessions: Path, args: argparse.Namespace
) -> Run:
    """wrk at ``campaign_id`` through the worker set of ``config.wait``, measured until the
    ledger has caught up with it."""
    workers = stack.sets[config.wait]
    print(f"  {config.name} ...", file=sys.stderr, flush=True)
    nodes_before, started = await node_cpu_s(stack), time.monotonic()
    calls_before = await master_calls(stack)
    before = {
        "app": tree_cpu_s(workers.pids),
        "HAProxy": tree_cpu_s(workers.haproxy_pids),
        "drainer": tree_cpu_s(stack.drainer_pids),
        "PostgreSQL": tree_cpu_s(stack.postgres_pids),
    }
    result = wrk(
        config.name,
        workers.grab_url(campaign_id),
        sessions,
        args.seconds,
        args.connections,
        workers.base,
    )
    calls_after = await master_calls(stack)
    spent = {
        "app": tree_cpu_s(workers.pids) - before["app"],
        "HAProxy": tree_cpu_s(workers.haproxy_pids) - before["HAProxy"],
    }
    await catch_up(stack.redis)
    nodes_after, elapsed = await node_cpu_s(stack), time.monotonic() - started
    spent["drainer"] = tree_cpu_s(stack.drainer_pids) - before["drainer"]
    spent["PostgreSQL"] = tree_cpu_s(stack.postgres_pids) - before["PostgreSQL"]
    won = dict.fromkeys(stack.masters, 0)
    for pool_id, n in (await won_by_pool(stack, campaign_id, config.shards)).items():
        won[stack.master_of(pool_id)] += n
    used = {
        port: max(0.0, nodes_after[port] - nodes_before[port] - stack.idle[port] * elapsed)
        for port in stack.nodes
    }
    return Run(
        config=config,
        seconds=result.requests / result.rps if result.rps else float(args.seconds),
        requests=result.requests,
        errors=result.errors,
        p99_ms=result.p99_ms,
        grabs=sum(won.values()),
        calls_by_master={port: calls_after[port] - calls_before[port] for port in stack.masters},
        masters={port: (won[port], used[port]) for port in stack.masters},
        replicas_cpu_s=sum(s for port, s in used.items() if port not in stack.masters),
        cpu_s=spent,
    )


async def ledger_matches(stack: ClusterStack, campaigns: dict[str, int]) -> bool:
    """Whether PostgreSQL holds exactly the grants the pools of each campaign counted
    (``campaigns``: id -> shards)."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        for campaign_id, shards in campaigns.items():
            won_count = won_fen = 0
            for pool_id in spread_pools(campaign_id, shards):
                count, fen = await stack.redis.hmget(
                    CampaignKeys.of(pool_id).meta, ["won_count", "won_fen"]
                )
                won_count += int(count or 0)
                won_fen += int(fen or 0)
            row = await conn.fetchrow(
                "SELECT count(*), coalesce(sum(amount_fen), 0) FROM grabs WHERE campaign_id = $1",
                campaign_id,
            )
            if row is None or (won_count, won_fen) != (row[0], row[1]):
                return False
        return True
    finally:
        await conn.close()


class Fit(NamedTuple):
    """A master's CPU as a cost per script call plus a cost per grab settled in it."""

    per_call_us: float
    per_grab_us: float
    points: int

    def at(self, batch: int) -> float:
        """CPU µs per grab at ``batch`` grabs per script call."""
        return self.per_grab_us + self.per_call_us / batch


def fit(runs: list[Run]) -> Fit:
    """Least squares over every master that settled grabs in ``runs``: its CPU per grab
    against its script calls per grab (K = 1 and K = N batch differently, so the two
    costs come apart)."""
    points = [
        (run.calls_by_master[port] / grabs, used * 1e6 / grabs)
        for run in runs
        for port, (grabs, used) in run.masters.items()
        if grabs
    ]
    slope, intercept = statistics.linear_regression(*zip(*points, strict=True))
    return Fit(slope, intercept, len(points))


def configs(masters: int) -> list[Config]:
    """What each round measures, in order."""
    return [Config(1, 0), Config(masters, 0), Config(masters, 1)]


async def full_path(args: argparse.Namespace) -> str:
    """Every round through the workers; the markdown report."""
    async with running(args.redis_cluster, args.workers) as stack:
        sessions = await mint_sessions(stack, args.players)
        plan = configs(args.redis_cluster)
        created: dict[str, int] = {}
        async with aiohttp.ClientSession() as http:
            base = stack.sets[0].base

            async def fresh(shards: int) -> str:
                cid = await create(
                    http, base, total_fen=args.players * 100, count=args.players, shards=shards
                )
                created[cid] = shards
                return cid

            print("  creating the campaigns ...", file=sys.stderr, flush=True)
            warm_up = await fresh(args.redis_cluster)
            per_round = [[await fresh(c.shards) for c in plan] for _ in range(args.rounds)]
        # Every worker's script line connects to every master and loads the scripts.
        for workers in stack.sets.values():
            url = workers.grab_url(warm_up)
            wrk("warm-up", url, sessions, WARM_UP_S, args.connections, workers.base)
        await catch_up(stack.redis)
        await measure_idle(stack)
        runs = [
            await one_run(stack, config, cid, sessions, args)
            for campaigns in per_round
            for config, cid in zip(plan, campaigns, strict=True)
        ]
        settled = await ledger_matches(stack, created)
    summaries = [Summary(c, [r for r in runs if r.config == c]) for c in plan]
    return render(args, summaries, runs, settled, stack.idle, set(stack.masters))


def fmt_list(values: list[float], digits: int = 1) -> str:
    """``values`` comma-separated."""
    return ", ".join(f"{v:.{digits}f}" for v in values)


def render(
    args: argparse.Namespace,
    summaries: list[Summary],
    runs: list[Run],
    ok: bool,
    idle: dict[int, float],
    master_ports: set[int],
) -> str:
    """The markdown report (``idle``: each node's idle CPU seconds per second)."""
    masters = args.redis_cluster
    idle_ms = {
        role: [idle[p] * 1e3 for p in sorted(idle) if (p in master_ports) == is_master]
        for role, is_master in (("masters", True), ("replicas", False))
    }
    lines = [
        f"The grab path on a local Redis Cluster of {masters} masters + {masters} replicas "
        f"(AOF everysec): {args.workers} workers per `REDIS_WAIT_REPLICAS` setting behind "
        f"HAProxy, one drainer at nice {DRAIN_NICE}, wrk -c{args.connections}, "
        f"{args.seconds} s per run, {args.rounds} round(s), {args.players:,} players "
        "(every grab a different player's, every one wins). Redis CPU is each node's "
        "INFO cpu (user + sys) from the start of a run until the ledger caught up with it, "
        f"less the node's idle CPU measured for {IDLE_S:.0f} s before the rounds (ms/s: "
        f"masters {fmt_list(idle_ms['masters'])}, replicas {fmt_list(idle_ms['replicas'])}).",
        "",
        "| campaign | grabs/s | p99 ms | script calls per grab | grabs per master, busiest "
        "first | Redis CPU µs per campaign grab, by master | µs per grab settled there "
        "| spread (CPU, grabs) |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for s in summaries:
        ranked = s.by_rank()
        shares = ", ".join(f"{grabs * 100 / s.grabs:.0f} %" for grabs, _ in ranked)
        spread = s.spread()
        spread_text = "one master" if spread is None else f"{spread[0]:.2f}, {spread[1]:.2f}"
        lines.append(
            f"| {s.config.name} | {s.grabs_per_s:,.0f} | {s.p99_ms:.1f} "
            f"| {s.calls_per_grab:.3f} | {shares} | {fmt_list(s.per_campaign_grab_us())} "
            f"| {fmt_list(s.per_settled_grab_us())} | {spread_text} |"
        )
    components = ("replicas", "app", "HAProxy", "drainer", "PostgreSQL")
    lines += [
        "",
        "CPU µs per winning grab of the rest (workers and HAProxy during the run; replicas, "
        "drainer and PostgreSQL until the ledger caught up):",
        "",
        "| campaign | all masters | " + " | ".join(components) + " |",
        "|---|" + "---:|" * (len(components) + 1),
    ]
    for s in summaries:
        cells = " | ".join(f"{s.us(c):.1f}" for c in components)
        lines.append(f"| {s.config.name} | {s.masters_us():.1f} | {cells} |")
    one, many, waited = summaries
    unwaited = fit([*one.runs, *many.runs])
    lines += [
        "",
        f"Fitted over the {unwaited.points} master-runs without WAIT (CPU per grab against "
        f"script calls per grab): {unwaited.per_call_us:.0f} µs per script call + "
        f"{unwaited.per_grab_us:.1f} µs per grab in it, so {unwaited.at(32):.1f} µs per grab "
        f"at 32 grabs per call and {unwaited.at(128):.1f} µs at 128 (GRAB_BATCH_MAX's "
        "default).",
    ]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "n/a"

    lines += [
        "",
        f"Ratios in this run, {many.config.name} against {one.config.name}:",
        f"- the busiest master's CPU per campaign grab: "
        f"{ratio(many.per_campaign_grab_us()[0], one.per_campaign_grab_us()[0])} "
        f"(1/{masters} = {1 / masters:.2f} is a perfect spread)",
        f"- a master's CPU per grab settled there (mean over the masters that settled any): "
        f"{ratio(statistics.mean(many.per_settled_grab_us()), one.per_settled_grab_us()[0])}",
        f"- every master's CPU per grab, summed: {ratio(many.masters_us(), one.masters_us())}",
        f"- grabs/s: {ratio(many.grabs_per_s, one.grabs_per_s)}",
        f"{waited.config.name} against {many.config.name}:",
        f"- every master's CPU per grab: {ratio(waited.masters_us(), many.masters_us())}",
        f"- the replicas' CPU per grab: {ratio(waited.us('replicas'), many.us('replicas'))}",
        f"- the workers' CPU per grab: {ratio(waited.us('app'), many.us('app'))}",
        f"- grabs/s: {ratio(waited.grabs_per_s, many.grabs_per_s)}, "
        f"p99: {ratio(waited.p99_ms, many.p99_ms)}",
        "",
        f"PostgreSQL holds exactly the grants the pools counted: {'yes' if ok else 'NO'}.",
    ]
    wrong = [r for r in runs if r.errors or r.grabs < r.requests]
    for r in wrong:
        lines.append(
            f"WARNING: {r.config.name}: {r.errors} wrk errors, {r.grabs} won of "
            f"{r.requests} answered"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Round:
    """What one settlement-only round measured."""

    name: str
    wait: int
    seconds: float
    grabs: int
    calls: int
    # master port -> (grabs settled there, Redis CPU seconds spent meanwhile)
    shards: dict[int, tuple[int, float]]

    def row(self) -> str:
        """One markdown table row."""
        per_grab = {port: cpu * 1e6 / grabs for port, (grabs, cpu) in self.shards.items() if grabs}
        spread = max(per_grab.values()) / min(per_grab.values()) if per_grab else 0.0
        shards = ", ".join(f":{port} {us:.1f}" for port, us in sorted(per_grab.items()))
        return (
            f"| {self.name} | {self.wait} | {self.grabs / self.seconds:,.0f} "
            f"| {self.calls / self.grabs:.3f} | {shards} | {spread:.2f} |"
        )


def campaign_per_master(cluster: EmbeddedCluster) -> dict[int, str]:
    """A campaign id whose slot each master serves: master port -> id."""
    out: dict[int, str] = {}
    for n in itertools.count():
        cid = f"bench-{n}"
        port = cluster.master_of(key_slot(CampaignKeys.of(cid).pool.encode())).port
        out.setdefault(port, cid)
        if len(out) == cluster.masters:
            return out
    raise AssertionError("unreachable")


async def load(redis: Redis, cid: str, envelopes: int) -> None:
    """An open red packet of ``envelopes`` 1-fen envelopes."""
    keys = CampaignKeys.of(cid)
    await redis.delete(keys.meta, keys.pool, keys.winners, keys.ledger)
    for start in range(0, envelopes, LOAD_CHUNK):
        stop = min(start + LOAD_CHUNK, envelopes)
        await redis.rpush(keys.pool, *(f"{seq}:1" for seq in range(start, stop)))
    await redis.hset(keys.meta, mapping={"starts_at_ms": 0, "ends_at_ms": 2**50})


def cpu_seconds(port: int) -> float:
    """used_cpu_user + used_cpu_sys of the node on ``port``."""
    import redis as sync_redis

    info = sync_redis.Redis(port=port).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def one_round(
    name: str,
    line: ClusterLine,
    scripts: Scripts,
    campaigns: dict[int, str],
    args: argparse.Namespace,
    players: itertools.count[int],
) -> Round:
    """Settle grabs on ``campaigns`` for ``args.seconds``."""
    won = dict.fromkeys(campaigns, 0)
    calls = 0
    before = {port: cpu_seconds(port) for port in campaigns}
    order = itertools.cycle(list(campaigns.items()))
    deadline = time.monotonic() + args.seconds

    async def caller() -> None:
        nonlocal calls
        while time.monotonic() < deadline:
            port, cid = next(order)
            users = [f"p{next(players)}" for _ in range(args.batch)]
            result = await scripts.grab_envelope(cid, users)
            calls += 1
            won[port] += sum(code is GrabCode.WON for code, _ in result.outcomes)

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(args.callers)))
    seconds = time.monotonic() - started
    shards = {port: (won[port], cpu_seconds(port) - before[port]) for port in campaigns}
    return Round(name, line.wait_replicas, seconds, sum(won.values()), calls, shards)


async def settlement(args: argparse.Namespace) -> str:
    """The settlement-only rounds on one cluster, no workers; the markdown report."""
    with tempfile.TemporaryDirectory(prefix="hb-bench-cluster-") as work:
        cluster = EmbeddedCluster(Path(work), masters=args.redis_cluster).start()
        try:
            redis = open_redis(cluster.url, cluster=True)
            campaigns = campaign_per_master(cluster)
            # Enough for every one of the 4 rounds at 100 k grabs/s on each campaign (the
            # hot one takes them all in two of them): never sold out.
            envelopes = args.seconds * 4 * 100_000
            for cid in campaigns.values():
                await load(redis, cid, envelopes)
            hot_port, hot = next(iter(campaigns.items()))
            players = itertools.count()
            rounds = []
            for wait in (0, 1):
                line = ClusterLine.from_url(cluster.url, wait_replicas=wait)
                assert line is not None
                scripts = Scripts(redis, line)
                await scripts.preload(redis)
                try:
                    for name, chosen in (
                        ("one hot campaign (one master)", {hot_port: hot}),
                        (f"{len(campaigns)} campaigns (every master)", campaigns),
                    ):
                        rounds.append(await one_round(name, line, scripts, chosen, args, players))
                finally:
                    line.close()
            await redis.aclose()
        finally:
            cluster.stop()
    lines = [
        f"Settlement only on a local Redis Cluster: {args.redis_cluster} masters + "
        f"{args.redis_cluster} replicas, {args.callers} batches of {args.batch} in flight, "
        f"{args.seconds} s per round, one Python client.",
        "",
        "| load | WAIT | grabs/s | script calls per grab | Redis CPU µs per grab, by master "
        "| spread (max/min) |",
        "|---|---:|---:|---:|---|---:|",
        *(r.row() for r in rounds),
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line of ``./hb bench --redis-cluster N``."""
    cli = argparse.ArgumentParser(prog="bench --redis-cluster")
    cli.add_argument(
        "--redis-cluster", type=int, default=3, help="masters, and K of the sharded runs (>= 3)"
    )
    cli.add_argument("--seconds", type=int, help=f"per run (default {FULL['seconds']})")
    cli.add_argument(
        "--rounds", type=int, help=f"rounds of every configuration (default {FULL['rounds']})"
    )
    cli.add_argument(
        "--players",
        type=int,
        help=f"players, and envelopes per campaign (default {FULL['players']:,})",
    )
    cli.add_argument(
        "--workers", type=int, default=2, help="workers per REDIS_WAIT_REPLICAS setting (default 2)"
    )
    cli.add_argument(
        "--connections", type=int, default=64, help="wrk's open connections (default 64)"
    )
    cli.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: "
        + " ".join(f"--{k} {v}" for k, v in QUICK.items())
        + " unless given (numbers too noisy to quote)",
    )
    cli.add_argument(
        "--settlement-only",
        action="store_true",
        help="the settlement script alone from one Python client, no workers (K = 1 campaigns)",
    )
    cli.add_argument(
        "--batch", type=int, default=32, help="players per script call (settlement only)"
    )
    cli.add_argument(
        "--callers", type=int, default=8, help="script calls in flight (settlement only)"
    )
    return cli


def main(argv: list[str] | None = None) -> None:
    """Parse, run, print the report."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.redis_cluster < 3:
        cli.error("--redis-cluster needs at least 3 masters")
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.settlement_only:
        print(asyncio.run(settlement(args)))
        return
    if shutil.which("wrk") is None or shutil.which("haproxy") is None:
        sys.exit("bench needs wrk and haproxy: apt-get install -y wrk haproxy")
    print(asyncio.run(full_path(args)))


if __name__ == "__main__":
    main()
