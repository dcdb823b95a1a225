"""The settlement path on a local Redis Cluster: ``./hb bench --redis-cluster N``.

Starts N masters and N replicas (app/local/cluster.py), loads one red packet per master
(each campaign's keys share a hash tag, so each lives on one master), and settles grabs
through the worker's own script line (app/store/scriptline.ClusterLine: one pipelined
connection per master, batches of ``--batch`` players per script call, ``--callers``
batches in flight) in four rounds of ``--seconds`` each:

* one hot campaign (every grab on one master) and all N campaigns at once (the load
  spread over the masters, as a campaign split over N shards would spread it);
* each with ``REDIS_WAIT_REPLICAS`` 0 and 1 (every call followed by ``WAIT 1``).

It reports grabs/s, script calls per grab, and each master's Redis CPU per grab (INFO
cpu, user + sys, before and after the round) with the spread between the masters. The
client is one Python process on the same machine, so grabs/s is the client's ceiling
here; the CPU each master spends per grab is what sizes a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from redis.crc import key_slot

from app.local.cluster import EmbeddedCluster
from app.store.client import open_redis
from app.store.scriptline import ClusterLine
from app.store.scripts import CampaignKeys, GrabCode, Scripts

LOAD_CHUNK = 10_000


@dataclass(frozen=True, slots=True)
class Round:
    """What one round measured."""

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


async def bench(args: argparse.Namespace) -> str:
    """Every round on one cluster; the markdown report."""
    with tempfile.TemporaryDirectory(prefix="hb-bench-cluster-") as work:
        cluster = EmbeddedCluster(Path(work), masters=args.redis_cluster).start()
        try:
            redis = open_redis(cluster.url, cluster=True)
            campaigns = campaign_per_master(cluster)
            # Enough for every round at a generous rate, never sold out.
            envelopes = args.seconds * 4 * 60_000 // len(campaigns) + 60_000
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
        f"Settlement on a local Redis Cluster: {args.redis_cluster} masters + "
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
    cli.add_argument("--redis-cluster", type=int, default=3, help="masters (>= 3; default 3)")
    cli.add_argument("--seconds", type=int, default=5, help="per round (default 5)")
    cli.add_argument("--batch", type=int, default=32, help="players per script call")
    cli.add_argument("--callers", type=int, default=8, help="script calls in flight")
    return cli


def main(argv: list[str] | None = None) -> None:
    """Parse, run, print the report."""
    args = parser().parse_args(argv)
    if args.redis_cluster < 3:
        parser().error("--redis-cluster needs at least 3 masters")
    print(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
