"""Instructions per request of each hot path, counted by callgrind.

Run: ``python -m bench.instructions``.

Wall-clock figures swing with whatever else the machine runs; the number of instructions
a worker executes for a request does not. This starts its own Redis and PostgreSQL
(embedded, as ``./hb bench`` does), one app worker (``python -m app worker``, the
ledger drained by nobody during the count) and one floor worker (bench/floor.py), each
under ``valgrind --tool=callgrind`` with instrumentation switched on only once the
worker is up and warm. For each path it sends WARM requests, zeroes the worker's
counters (``callgrind_control -z``), sends REQUESTS more over CONNECTIONS keep-alive
connections (each carrying the headers wrk sends in ``./hb bench`` plus the
``X-Request-ID`` HAProxy adds, every request a different player), dumps the counters
(``callgrind_control -d``) and divides. What the worker runs on its own meanwhile (the
10 ms loop probe, the lag sampler, health probes) is measured over an idle window
first and subtracted at its rate per second of each run.

Paths: the floor, a winning grab, already won (the same players again), sold out, ended,
not started, a lottery draw. Every answer is checked (status and result), so a count
never describes an error path by mistake. Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import aiohttp
import orjson
from redis.asyncio import Redis

from app.identity.sessions import SessionStore
from app.local.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from bench.campaigns import closed_windows, create, create_lottery, sell_out
from bench.measure import script_calls
from bench.stack import ROOT, app_env, processes, wait_ready

# The worker, its periodic background work (the 10 ms loop probe, the ledger-lag
# sampler, the PostgreSQL probe, the events ping) made hourly: it runs per second, not
# per request, and at callgrind's pace it would be a large and load-dependent share.
QUIET_WORKER = """
import runpy, sys
import app.background.events as events, app.background.lag as lag
import app.web.handlers.ops as ops, app.web.readiness as readiness
for module, name in ((readiness, "LOOP_TICK_S"), (ops, "LEDGER_PROBE_EVERY_S"),
                     (events, "PING_EVERY_S")):
    assert hasattr(module, name), name
    setattr(module, name, 3600.0)
assert lag.watch_lag.__defaults__ is not None
lag.watch_lag.__defaults__ = (3600.0,)
sys.argv = ["app", "worker"]
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""
VALGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no")
# How long the idle window lasts, seconds: background work is a few timers a second.
IDLE_S = 3.0
# Idle means at most this many instructions per second (a few timers and the listener).
IDLE_MAX = 300_000
STARTUP_S = 300.0

Check = Callable[[int, dict[str, object]], bool]


@dataclass
class Worker:
    """A process under callgrind and where its counter dumps go."""

    name: str
    pid: int
    port: int
    dumps: Path

    def control(self, *flags: str) -> None:
        """Run ``callgrind_control <flags> <pid>``."""
        subprocess.run(
            ["callgrind_control", *flags, str(self.pid)], check=True, capture_output=True
        )

    def count(self) -> int:
        """Dump the counters and return the instructions since the last zeroing."""
        before = set(self.dumps.glob(f"{self.name}.{self.pid}*"))
        self.control("-d")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = set(self.dumps.glob(f"{self.name}.{self.pid}*")) - before
            for path in new:
                match = re.search(rb"^(?:summary|totals): (\d+)", path.read_bytes(), re.M)
                if match:
                    return int(match.group(1))
            time.sleep(0.1)
        raise RuntimeError(f"no callgrind dump from {self.name}")


class Row(NamedTuple):
    """One path's instructions per request: median, lowest and highest of the repeats."""

    name: str
    median: float
    low: float
    high: float
    note: str


async def quiet(worker: Worker) -> float:
    """Switch counting on; once what the warm-up set off in the background is done (the
    winners index of a sold-out campaign loads after its last grab), the instructions
    per second ``worker`` runs on its own."""
    worker.control("-i", "on")
    deadline = time.monotonic() + STARTUP_S
    while True:
        worker.control("-z")
        began = time.monotonic()
        await asyncio.sleep(IDLE_S)
        rate = worker.count() / (time.monotonic() - began)
        print(f"  {worker.name} idle: {rate:,.0f} instructions/s", file=sys.stderr)
        if rate < IDLE_MAX or time.monotonic() > deadline:
            return rate


def request(method: str, port: int, path: str, token: str, origin: str) -> bytes:
    """One request as wrk (bench/wrk/players.lua) and HAProxy put it on the wire."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Cookie: hb_session={token}\r\nOrigin: {origin}\r\nX-Requested-With: hongbao\r\n"
        f"X-Request-ID: {uuid.uuid4()}\r\n\r\n"
    ).encode()


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int, connections: int) -> list[Connection]:
    """Open ``connections`` keep-alive connections (before counting, as wrk's stay open)."""
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]


async def close(opened: list[Connection]) -> None:
    """Close connections opened by connect()."""
    for _, writer in opened:
        writer.close()
        await writer.wait_closed()


async def _one_connection(
    connection: Connection, queue: Iterator[bytes], answers: list[tuple[int, bytes]]
) -> None:
    reader, writer = connection
    for raw in queue:
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(length.group(1))) if length else b""
        answers.append((status, body))


async def send(opened: list[Connection], requests: list[bytes]) -> list[tuple[int, bytes]]:
    """Send ``requests`` over the ``opened`` connections, one at a time on each; every
    answer."""
    answers: list[tuple[int, bytes]] = []
    queue = iter(requests)
    await asyncio.gather(*(_one_connection(c, queue, answers) for c in opened))
    return answers


def checked(name: str, answers: list[tuple[int, bytes]], check: Check) -> None:
    """Stop unless every answer is the path's own."""
    wrong = Counter(
        (status, body[:80]) for status, body in answers if not check(status, orjson.loads(body))
    )
    if wrong:
        raise RuntimeError(f"{name}: unexpected answers {dict(wrong)}")


def start(
    name: str, args: list[str], env: dict[str, str], dumps: Path, log: Path
) -> subprocess.Popen[bytes]:
    """``args`` under callgrind, instrumentation off until switched on."""
    out = dumps / f"{name}.%p"
    with open(log, "wb") as sink:
        return subprocess.Popen(
            [*VALGRIND, f"--callgrind-out-file={out}", *args],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def result_is(*results: str) -> Check:
    """An answer 200 whose ``result`` is one of ``results``."""
    return lambda status, body: status == 200 and body.get("result") in results


def error_is(status_code: int, error: str) -> Check:
    """An error answer of ``status_code`` with code ``error``."""
    return lambda status, body: status == status_code and body.get("error") == error


@contextmanager
def stores(work: Path) -> Iterator[tuple[str, str]]:
    """Embedded Redis and PostgreSQL, stopped on exit: their URLs."""
    with ExitStack() as exits:
        redis_srv = EmbeddedRedis(work / "redis", free_port()).start()
        exits.callback(redis_srv.stop)
        pg_srv = EmbeddedPostgres(work / "pg", free_port()).start()
        exits.callback(pg_srv.stop)
        yield redis_srv.url, pg_srv.url


async def measure(args: argparse.Namespace, work: Path) -> list[Row]:
    """Every path's instructions per request: ``(path, instructions, note)``."""
    with stores(work) as (redis_url, database_url), processes() as procs:
        app_port, floor_port = free_port(), free_port()
        origin = f"http://127.0.0.1:{app_port}"
        env = app_env(redis_url, database_url, app_port, "process")
        env["PYTHONHASHSEED"] = "0"
        env.update(item.split("=", 1) for item in args.env)
        procs.append(
            start(
                "app",
                [sys.executable, "-c", QUIET_WORKER],
                {**env, "PORT": str(app_port)},
                work,
                work / "app.log",
            )
        )
        procs.append(
            start(
                "floor",
                [sys.executable, str(ROOT / "bench/floor.py")],
                {**env, "PORT": str(floor_port)},
                work,
                work / "floor.log",
            )
        )
        app = Worker("app", procs[0].pid, app_port, work)
        floor = Worker("floor", procs[1].pid, floor_port, work)
        for worker in (app, floor):
            await wait_ready(f"http://127.0.0.1:{worker.port}/readyz", timeout=STARTUP_S)
        redis = Redis.from_url(redis_url)
        try:
            return await _paths(args, redis, app, floor, origin)
        finally:
            await redis.aclose()


async def _paths(
    args: argparse.Namespace, redis: Redis, app: Worker, floor: Worker, origin: str
) -> list[Row]:
    n, warm, repeat = args.requests, args.warm, args.repeat
    players = warm + repeat * n
    tokens = await SessionStore(redis, 3600).mint([f"ins-{i:07d}" for i in range(players + 1)])
    base = f"http://127.0.0.1:{app.port}"
    async with aiohttp.ClientSession() as http:
        # Twice the players' envelopes: the already-won path finds it still open.
        grab = await create(http, base, total_fen=players * 200, count=2 * players)
        # Exactly one each: sold out by the players, who then ask again.
        full = await create(http, base, total_fen=players * 100, count=players)
        sold = await create(http, base, total_fen=100, count=1)
        ended, early = await closed_windows(http, base)
        lottery = await create_lottery(http, base)
        await sell_out(http, base, sold, tokens[-1])

    def reqs(port: int, route: str, first: int, count: int) -> list[bytes]:
        return [
            request("POST", port, route, tokens[i], origin) for i in range(first, first + count)
        ]

    paths = [
        (floor, "floor", "/api/campaigns/x/grab", result_is("sold_out")),
        (app, "sold out", f"/api/campaigns/{sold}/grab", result_is("sold_out")),
        (app, "ended (409)", f"/api/campaigns/{ended}/grab", error_is(409, "ended")),
        (app, "not started (409)", f"/api/campaigns/{early}/grab", error_is(409, "not_started")),
        (app, "grab (won)", f"/api/campaigns/{grab}/grab", result_is("won")),
        (app, "already won", f"/api/campaigns/{grab}/grab", result_is("already_won")),
        (app, "already won, sold out", f"/api/campaigns/{full}/grab", result_is("already_won")),
        (app, "lottery draw", f"/api/campaigns/{lottery}/draw", result_is("prize", "no_prize")),
    ]
    if args.paths:
        paths = [p for p in paths if p[1] in args.paths or p[1] == "floor"]
    opened = {w.name: await connect(w.port, args.connections) for w in (app, floor)}
    # Every player's session is seen once first (as in a long bench), and the players
    # sell out ``full``; instrumentation off.
    for route, check in (
        (f"/api/campaigns/{sold}/grab", result_is("sold_out")),
        (f"/api/campaigns/{full}/grab", result_is("won")),
    ):
        checked("warm-up", await send(opened["app"], reqs(app.port, route, 0, players)), check)
    idle = {worker.name: await quiet(worker) for worker in (app, floor)}
    rows: list[Row] = []
    for worker, name, route, check in paths:
        conns = opened[worker.name]
        checked(name, await send(conns, reqs(worker.port, route, 0, warm)), check)
        counts: list[float] = []
        calls = await script_calls(redis)
        for r in range(repeat):
            measured = reqs(worker.port, route, warm + r * n, n)
            worker.control("-z")
            began = time.monotonic()
            answers = await send(conns, measured)
            counts.append((worker.count() - idle[worker.name] * (time.monotonic() - began)) / n)
            checked(name, answers, check)
        calls = await script_calls(redis) - calls
        note = f"{calls / (n * repeat):.3f} script calls per request" if calls else ""
        row = Row(name, statistics.median(counts), min(counts), max(counts), note)
        rows.append(row)
        print(f"  {row}", file=sys.stderr)
    for conns in opened.values():
        await close(conns)
    return rows


def render(rows: list[Row], args: argparse.Namespace) -> str:
    """The markdown table."""
    floor = next((row.median for row in rows if row.name == "floor"), None)
    lines = [
        f"one worker under callgrind; per path {args.warm} warm-up requests, then "
        f"{args.repeat} x {args.requests} counted, {args.connections} connections; "
        "median (min-max) of the repeats",
        "",
        "| path | instructions per request | min-max | x floor | |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = "—" if floor is None or row.name == "floor" else f"{row.median / floor:.2f}"
        lines.append(
            f"| {row.name} | {row.median:,.0f} | {row.low / 1000:,.0f}k-{row.high / 1000:,.0f}k"
            f" | {ratio} | {row.note} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    cli = argparse.ArgumentParser(prog="python -m bench.instructions")
    cli.add_argument("--requests", type=int, default=1000, help="counted requests per repeat")
    cli.add_argument("--repeat", type=int, default=3, help="counts per path (median shown)")
    cli.add_argument("--warm", type=int, default=200, help="warm-up requests per path")
    cli.add_argument("--connections", type=int, default=16)
    cli.add_argument(
        "--paths",
        type=lambda v: v.split(","),
        default=None,
        help="comma-separated path names to measure (the floor always is)",
    )
    cli.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the app worker (e.g. ACCESS_LOG=0, to see what a part costs)",
    )
    return cli


def main() -> None:
    """Measure and print the table."""
    args = parser().parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench.instructions needs valgrind: apt-get install -y valgrind")
    work = Path(tempfile.mkdtemp(prefix="hongbao-instructions-"))
    try:
        rows = asyncio.run(measure(args, work))
    finally:
        if not os.environ.get("KEEP_WORK"):
            shutil.rmtree(work, ignore_errors=True)
    print(render(rows, args))


if __name__ == "__main__":
    main()
