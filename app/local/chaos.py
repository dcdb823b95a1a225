"""``./hb chaos``: the real stack under load, one fault after another, and the books after each.

The stack runs on free loopback ports, all owned here: redis-server with AOF (the
``--appendfsync`` policy asked for), PostgreSQL, a silent-capable TCP proxy between the
workers and Redis, two workers (no drainer inside), one drainer process, and HAProxy
with the production config. Players grab through HAProxy, each until a 200 answers,
while a fault is injected:

1. SIGKILL a worker (restarted on its port);
2. SIGKILL the drainer (restarted; the new one claims what the dead one held);
3. SIGKILL redis-server, restarted from its AOF;
4. stop PostgreSQL (20 s; ``--short``: 5 s);
5. cut Redis silent (10 s; ``--short``: 3 s): connections stay open, no byte moves.

Each phase has a campaign of its own. After it, once the ledger stream is drained, it
prints what players were told against what Redis and PostgreSQL hold: acknowledged
grants lost (told won, not a winner in Redis or not in PostgreSQL), duplicated (told
"won" twice), wrong (another amount), and ``reconcile``'s verdict. Under ``appendfsync
always`` any loss fails the run (exit 1); under ``everysec`` losses after the Redis
SIGKILL are the documented loss window and are reported, not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import asyncpg
import orjson
from redis.asyncio import Redis

from app.campaigns import operations
from app.identity.sessions import SessionStore
from app.local.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from app.local.haproxy import LOCAL_CONFIG, EdgeProxy, edge_env, render_local_config
from app.records import Envelope
from app.store.scripts import CampaignKeys

ADMIN_TOKEN = "chaos-admin-token-0123456789"
# What the H5 page sends: passes the CSRF same-origin check.
PAGE_HEADERS = {"X-Requested-With": "hongbao"}
GRAB_ROUTE = "/api/campaigns/{}/grab"
PLAYERS_PER_S = 1500


class SilentProxy:
    """A TCP proxy to ``target`` that can go silent: connections stay open, no byte moves.

    While silent, bytes read on either side are held (and new connections are accepted
    but not connected upstream); when it speaks again they flow on, as after a healed
    network partition.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def url(self) -> str:
        """A redis:// URL through the proxy (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> SilentProxy:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def go_silent(self) -> None:
        """Stop forwarding (connections stay open)."""
        self._flowing.clear()

    def speak(self) -> None:
        """Forward again, held bytes first."""
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        if self._closed:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        if self._closed:
            # close() ran while we connected: it cancelled the pumps it knew of.
            writer.close()
            up_writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, (writer, up_writer)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            for writer in both:
                writer.close()

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class Stack:
    """Redis (AOF), PostgreSQL, the proxy, workers, a drainer process and HAProxy."""

    tmp: Path
    appendfsync: str = "always"
    workers: int = 2
    drain_in_worker: bool = False
    redis_timeout_ms: int = 1000
    redis: EmbeddedRedis | None = None
    pg: EmbeddedPostgres | None = None
    proxy: SilentProxy | None = None
    edge: EdgeProxy | None = None
    worker_ports: list[int] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The public (HAProxy) base URL."""
        assert self.edge is not None
        return f"http://127.0.0.1:{self.edge.public_port}"

    @property
    def redis_url(self) -> str:
        """Redis itself, not through the proxy (for the checks)."""
        assert self.redis is not None
        return self.redis.url

    @property
    def database_url(self) -> str:
        """The PostgreSQL database."""
        assert self.pg is not None
        return self.pg.url

    def _env(self) -> dict[str, str]:
        assert self.proxy is not None
        return {
            **os.environ,
            "REDIS_URL": self.proxy.url,
            "DATABASE_URL": self.database_url,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "INSECURE_COOKIES": "1",
            "REDIS_TIMEOUT_MS": str(self.redis_timeout_ms),
            "LEDGER_DRAIN_IN_WORKER": "1" if self.drain_in_worker else "0",
            "LEDGER_BLOCK_MS": "200",
            "LEDGER_CLAIM_IDLE_MS": "2000",
            "LEDGER_RETRY_MAX_MS": "500",
            "DRAIN_DELAY_S": "0.5",
            "ACCESS_LOG": "0",
        }

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        log.close()

    def start_worker(self, n: int) -> None:
        """Start (or restart) worker ``n`` on its port."""
        env = {**self._env(), "HOST": "127.0.0.1", "PORT": str(self.worker_ports[n])}
        self._spawn(f"w{n + 1}", [sys.executable, "-m", "app", "worker"], env)

    def start_drainer(self) -> None:
        """Start (or restart) the drainer process."""
        self._spawn("drainer", [sys.executable, "-m", "app", "drain"], self._env())

    def start_redis(self) -> None:
        """Start redis-server (again) on its port, loading its AOF."""
        assert self.redis is not None
        self.redis.start()

    async def start(self) -> Stack:
        """Start everything and wait until HAProxy has every worker up."""
        self.redis = EmbeddedRedis(self.tmp / "redis", free_port(), self.appendfsync).start()
        self.pg = EmbeddedPostgres(self.tmp / "pg", free_port()).start()
        self.proxy = await SilentProxy(self.redis.port).start()
        ports: set[int] = set()
        while len(ports) < self.workers:
            ports.add(free_port())
        self.worker_ports = sorted(ports)
        for n in range(self.workers):
            self.start_worker(n)
        if not self.drain_in_worker:
            self.start_drainer()
        config = self.tmp / "haproxy.cfg"
        config.write_text(render_local_config(LOCAL_CONFIG.read_text(), self.worker_ports))
        env = edge_env(free_port(), free_port(), self.tmp / "haproxy.sock")
        # Every request of the run comes from 127.0.0.1; each player grabs a few times.
        env.update({"HB_CHECK_INTER": "250ms", "HB_IP_RATE": "10000000", "HB_SESSION_RATE": "1000"})
        public = int(env["HB_BIND"].rsplit(":", 1)[1])
        self.edge = EdgeProxy(config, public, env).start(self.tmp / "haproxy.log")
        await self.wait_workers_ready(60)
        return self

    async def __aenter__(self) -> Stack:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_workers_ready(self, within_s: float) -> None:
        """Until every worker answers /readyz 200 on its own port (bounded)."""
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as http:
            for port in self.worker_ports:
                while True:
                    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                        async with http.get(
                            f"http://127.0.0.1:{port}/readyz",
                            timeout=aiohttp.ClientTimeout(total=2),
                        ) as resp:
                            if resp.status == 200:
                                break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"worker on :{port} not ready within {within_s}s")
                    await asyncio.sleep(0.1)
        # HAProxy needs two passing checks (rise 2) at 250 ms.
        await asyncio.sleep(0.8)

    def kill(self, name: str) -> None:
        """SIGKILL one of the processes started here and reap it."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def kill_redis(self) -> None:
        """SIGKILL redis-server (no AOF fsync beyond what its policy already did)."""
        assert self.redis is not None
        assert self.redis.proc is not None
        self.redis.proc.send_signal(signal.SIGKILL)
        self.redis.proc.wait(timeout=10)

    async def stop(self) -> None:
        """Stop everything started here."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.edge is not None:
            self.edge.stop(timeout=5)
        if self.proxy is not None:
            await self.proxy.close()
        for service in (self.pg, self.redis):
            if service is not None:
                service.stop()


@dataclass
class Answer:
    """One response a player got."""

    status: int
    body: dict[str, object]
    seconds: float


@dataclass
class Load:
    """Players grabbing through HAProxy, each until it gets a 200 (or the load stops)."""

    url: str
    campaign_id: str
    tokens: dict[str, str]
    concurrency: int = 24
    # Pause between a player's failed attempt and its retry.
    retry_pause_s: float = 0.2
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Grab as every player in turn, ``concurrency`` at once, until stopped."""
        players = iter(self.tokens.items())
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=PAGE_HEADERS,
            timeout=aiohttp.ClientTimeout(total=20),
        ) as http:

            async def lane() -> None:
                for openid, token in players:
                    if self.stopped.is_set():
                        return
                    await self._player(http, openid, token)

            await asyncio.gather(*(lane() for _ in range(self.concurrency)))

    async def _player(self, http: aiohttp.ClientSession, openid: str, token: str) -> None:
        answers = self.answers.setdefault(openid, [])
        url = f"{self.url}{GRAB_ROUTE.format(self.campaign_id)}"
        # Once stopped, a player already under way still retries (bounded) for its answer.
        for _ in range(100):
            start = time.monotonic()
            try:
                async with http.post(url, headers={"Cookie": f"hb_session={token}"}) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                answers.append(Answer(0, {"error": type(exc).__name__}, time.monotonic() - start))
            else:
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    body = {"error": "not_json", "raw": raw[:200].decode(errors="replace")}
                answers.append(Answer(status, body, time.monotonic() - start))
                if status == 200:
                    return
            await asyncio.sleep(self.retry_pause_s)

    def told_won(self) -> dict[str, list[int]]:
        """openid -> the amounts each 200 "won"/"already_won" answer told the player."""
        out: dict[str, list[int]] = {}
        for openid, answers in self.answers.items():
            for a in answers:
                if a.status == 200 and a.body.get("result") in ("won", "already_won"):
                    out.setdefault(openid, []).append(int(str(a.body["amount_fen"])))
        return out

    def all_answers(self) -> list[Answer]:
        """Every answer of the run."""
        return [a for answers in self.answers.values() for a in answers]


@dataclass
class Verdict:
    """What players were told against what Redis and PostgreSQL hold, for one campaign."""

    phase: str
    requests: int
    failed: int
    slowest_failure_s: float
    told: int
    lost: int
    lost_in_pg: int
    duplicated: int
    wrong: int
    unacknowledged: int
    pg_extra: int
    rejects: int
    reconcile_ok: bool
    reconcile_text: str

    @classmethod
    def not_run(cls, phase: str) -> Verdict:
        """A phase whose load could not even start: a failure."""
        return cls(phase, 0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, False, "phase did not run")

    @property
    def exact(self) -> bool:
        """Nothing lost, duplicated or wrong; PostgreSQL equals Redis; reconcile agrees."""
        return (
            not (self.lost or self.lost_in_pg or self.duplicated or self.wrong)
            and not (self.pg_extra or self.rejects)
            and self.reconcile_ok
        )

    def render(self) -> str:
        """A few lines for the run's output."""
        return "\n".join(
            [
                f"== {self.phase}",
                f"   requests {self.requests}, failed (non-200) {self.failed}, "
                f"slowest failure {self.slowest_failure_s:.2f}s",
                f"   players told they won: {self.told}; acknowledged grants lost: {self.lost} "
                f"(not in PostgreSQL: {self.lost_in_pg}), duplicated: {self.duplicated}, "
                f"wrong amount: {self.wrong}",
                f"   grants never acknowledged (reply lost, player gave up): "
                f"{self.unacknowledged}; PostgreSQL rows Redis lacks: {self.pg_extra}; "
                f"ledger rejects: {self.rejects}",
                f"   reconcile: {'OK' if self.reconcile_ok else 'MISMATCH'}"
                + ("" if self.reconcile_ok else "\n" + self.reconcile_text),
            ]
        )


async def wait_drained(redis: Redis, campaign_id: str, within_s: float) -> bool:
    """Until the campaign's ledger stream is empty (bounded); whether it emptied."""
    stream = CampaignKeys.of(campaign_id).ledger
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ConnectionError):
            if await redis.xlen(stream) == 0:
                return True
        await asyncio.sleep(0.2)
    return False


async def verdict(redis_url: str, database_url: str, phase: str, load: Load) -> Verdict:
    """Compare what ``load``'s players were told with Redis, PostgreSQL and reconcile."""
    redis = Redis.from_url(redis_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    cid = load.campaign_id
    try:
        await wait_drained(redis, cid, 90)
        raw = cast(dict[bytes, bytes], await redis.hgetall(CampaignKeys.of(cid).winners))
        winners = {k.decode(): Envelope.decode(v).amount_fen for k, v in raw.items()}
        rows = await pool.fetch("SELECT openid, amount_fen FROM grabs WHERE campaign_id = $1", cid)
        recorded = {r["openid"]: r["amount_fen"] for r in rows}
        rejects = await pool.fetchval(
            "SELECT count(*) FROM ledger_rejects WHERE campaign_id = $1", cid
        )
        report = await operations.reconcile(redis, pool, cid)
    finally:
        await pool.close()
        await redis.aclose()
    told = load.told_won()
    won_twice = sum(
        sum(a.status == 200 and a.body.get("result") == "won" for a in answers) > 1
        for answers in load.answers.values()
    )
    answers = load.all_answers()
    failures = [a for a in answers if a.status != 200]
    return Verdict(
        phase=phase,
        requests=len(answers),
        failed=len(failures),
        slowest_failure_s=max((a.seconds for a in failures), default=0.0),
        told=len(told),
        lost=sum(openid not in winners for openid in told),
        lost_in_pg=sum(openid not in recorded for openid in told),
        duplicated=won_twice,
        wrong=sum(
            openid in winners and any(amount != winners[openid] for amount in amounts)
            for openid, amounts in told.items()
        ),
        unacknowledged=sum(openid not in told for openid in winners),
        pg_extra=sum(openid not in winners for openid in recorded),
        rejects=int(rejects),
        reconcile_ok=report.ok,
        reconcile_text=report.render(),
    )


async def create_campaign(url: str, name: str, count: int = 200_000) -> str:
    """A red packet big enough not to sell out during a phase (retried while the stack
    is still recovering from the previous fault, bounded)."""
    body = {"kind": "red_packet", "name": name, "total_fen": count * 100, "count": count}
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.post(
                f"{url}/api/admin/campaigns",
                json=body,
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}", **PAGE_HEADERS},
                timeout=aiohttp.ClientTimeout(total=120),
            ) as resp:
                data = await resp.json(content_type=None)
                if resp.status == 201:
                    return str(data["id"])
            if resp.status < 500 or time.monotonic() > deadline:
                raise RuntimeError(f"campaign not created: {resp.status} {data}")
            await asyncio.sleep(1)


async def mint_players(redis_url: str, prefix: str, count: int) -> dict[str, str]:
    """``count`` player sessions, minted straight into Redis."""
    redis = Redis.from_url(redis_url)
    try:
        openids = [f"{prefix}{i:06d}" for i in range(count)]
        tokens = await SessionStore(redis, 24 * 3600).mint(openids)
    finally:
        await redis.aclose()
    return dict(zip(openids, tokens, strict=True))


async def under_load(
    stack: Stack,
    phase: str,
    fault: Callable[[], Awaitable[None]],
    players: int,
    before_s: float,
    after_s: float,
) -> Verdict:
    """A fresh campaign; load for ``before_s``, then ``fault()``, then ``after_s`` more."""
    cid = await create_campaign(stack.url, phase)
    load = Load(stack.url, cid, await mint_players(stack.redis_url, f"{phase[:8]}-", players))
    running = asyncio.create_task(load.run())
    await asyncio.sleep(before_s)
    await fault()
    await asyncio.sleep(after_s)
    load.stopped.set()
    await asyncio.wait_for(running, 120)
    return await verdict(stack.redis_url, stack.database_url, phase, load)


async def _phases(stack: Stack, outage_s: float, silent_s: float, settle_s: float) -> list[Verdict]:
    """Each fault under load on a campaign of its own, one after another."""

    async def kill_worker() -> None:
        stack.kill("w1")
        await asyncio.sleep(0.5)
        stack.start_worker(0)

    async def kill_drainer() -> None:
        stack.kill("drainer")
        await asyncio.sleep(settle_s)
        stack.start_drainer()

    async def kill_redis() -> None:
        stack.kill_redis()
        await asyncio.sleep(0.5)
        stack.start_redis()

    async def stop_postgres() -> None:
        assert stack.pg is not None
        stack.pg.stop()
        await asyncio.sleep(outage_s)
        stack.pg.start()

    async def silence_redis() -> None:
        assert stack.proxy is not None
        stack.proxy.go_silent()
        await asyncio.sleep(silent_s)
        stack.proxy.speak()

    # (phase, fault, how long the fault lasts)
    phases: list[tuple[str, Callable[[], Awaitable[None]], float]] = [
        ("worker-sigkill", kill_worker, 0.5),
        ("drainer-sigkill", kill_drainer, settle_s),
        ("redis-sigkill-aof-restart", kill_redis, 0.5),
        (f"postgres-stopped-{outage_s:.0f}s", stop_postgres, outage_s),
        (f"redis-silent-{silent_s:.0f}s", silence_redis, silent_s),
    ]
    verdicts: list[Verdict] = []
    for phase, fault, lasts_s in phases:
        phase_start = time.monotonic()
        # Enough players that the load outlasts the phase even on a fast machine.
        players = int(PLAYERS_PER_S * (settle_s * 3 + lasts_s))
        try:
            result = await under_load(stack, phase, fault, players, settle_s, settle_s * 2)
        except (RuntimeError, OSError, aiohttp.ClientError, TimeoutError) as exc:
            print(f"== {phase}\n   could not run: {exc!r}", flush=True)
            verdicts.append(Verdict.not_run(phase))
            continue
        verdicts.append(result)
        print(result.render(), f"\n   ({time.monotonic() - phase_start:.0f}s)", flush=True)
    return verdicts


async def run_chaos(appendfsync: str, short: bool, tmp: Path) -> int:
    """Run every phase; print each verdict; return the exit code."""
    outage_s, silent_s, settle_s = (5.0, 3.0, 3.0) if short else (20.0, 10.0, 5.0)
    print(f"chaos: starting the stack in {tmp} (appendfsync {appendfsync})", flush=True)
    started = time.monotonic()
    async with Stack(tmp, appendfsync=appendfsync) as stack:
        verdicts = await _phases(stack, outage_s, silent_s, settle_s)
    failed = [v for v in verdicts if not v.exact]
    print(f"chaos: {len(verdicts)} phases in {time.monotonic() - started:.0f}s", flush=True)
    if not failed:
        print("chaos: PASS: no acknowledged grant lost, duplicated or wrong; books exact")
        return 0
    window = [v for v in failed if v.phase.startswith("redis-sigkill")]
    if appendfsync == "everysec" and failed == window:
        lost = sum(v.lost for v in window)
        print(
            f"chaos: PASS with the everysec loss window: {lost} acknowledged grant(s) lost "
            "by the Redis SIGKILL (at most ~1 s of writes; use appendfsync always to lose none)"
        )
        return 0
    print("chaos: FAIL: " + ", ".join(v.phase for v in failed))
    return 1


def chaos(appendfsync: str, short: bool, keep: Path | None = None) -> int:
    """``./hb chaos``: run in a temporary directory (or ``keep``), return the exit code
    (2, with one line, when the stack cannot start: a missing haproxy, say)."""
    try:
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            return asyncio.run(run_chaos(appendfsync, short, keep))
        with tempfile.TemporaryDirectory(prefix="hb-chaos-") as tmp:
            return asyncio.run(run_chaos(appendfsync, short, Path(tmp)))
    except RuntimeError as exc:
        print(f"hongbao chaos: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
