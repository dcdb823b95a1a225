"""The OpenResty comparison: our grab path against nginx + ngx_lua doing the same grab.

bench/openresty/nginx.conf and grab.lua are what a seckill engineer would write: two
nginx workers, an HMAC-SHA1-signed cookie checked per request, one ``EVALSHA`` of our
own lua/grab_envelope.lua per grab over a keepalive pool of Redis connections, no
HAProxy, no ledger drain. nginx (Debian's nginx-light + libnginx-mod-http-lua) runs as
a child in the foreground with its own prefix folder, on a free loopback port.

Its campaigns are created through the operator API like the others, then taken off
the drainers' list (the comparison drains nothing); after each run, ``settlement``
checks what the script wrote in Redis.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import os
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from redis.asyncio import Redis

from app.records import Envelope, GrabRecord, LedgerEntry
from app.store.scripts import CAMPAIGNS_SET, CampaignKeys

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "bench" / "openresty"
CONFIG = FILES / "nginx.conf"
GRAB_LUA = FILES / "grab.lua"
GRAB_SCRIPT = ROOT / "lua" / "grab_envelope.lua"
# Debian's nginx-light is /usr/sbin/nginx, which an ordinary user's PATH may lack.
NGINX_DIRS = f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin"
LUA_MODULE = Path("/usr/lib/nginx/modules/ngx_http_lua_module.so")
COOKIE_TTL_S = 3600
# What the comparison runs on, named in the report.
PACKAGES = ("nginx-light", "libnginx-mod-http-lua", "libluajit2-5.1-2")


def nginx_binary() -> str | None:
    """The nginx to run, if nginx and its Lua module are installed."""
    found = shutil.which("nginx", path=NGINX_DIRS)
    return found if found is not None and LUA_MODULE.exists() else None


def versions() -> str:
    """The Debian packages the comparison runs on, with their versions."""
    if shutil.which("dpkg-query") is None:
        return "versions unknown (no dpkg-query)"
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}, ", *PACKAGES],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.rstrip(", ") or "versions unknown"


def mint(key: bytes, openid: str, expires_s: int) -> str:
    """The cookie value grab.lua accepts for ``openid`` until ``expires_s``."""
    body = f"{openid}.{expires_s}"
    mac = base64.urlsafe_b64encode(hmac.new(key, body.encode(), hashlib.sha1).digest())
    return f"{body}.{mac.rstrip(b'=').decode()}"


def write_sessions(path: Path, key: bytes, openids: list[str]) -> None:
    """A sessions file for bench/wrk/players.lua: the same players, grab.lua's cookies."""
    expires = int(time.time()) + COOKIE_TTL_S
    path.write_text("".join(f"{o}\t{mint(key, o, expires)}\n" for o in openids))


def layout(prefix: Path, port: int) -> Path:
    """nginx's prefix folder: conf/ with the shipped config, grab.lua, our grab script
    and the listen directive for ``port``; return the config's path."""
    conf = prefix / "conf"
    for folder in (conf, prefix / "logs", prefix / "tmp"):
        folder.mkdir(parents=True, exist_ok=True)
    for source in (CONFIG, GRAB_LUA, GRAB_SCRIPT):
        shutil.copyfile(source, conf / source.name)
    # reuseport: each worker accepts on its own socket, so connections spread evenly.
    (conf / "listen.conf").write_text(f"listen 127.0.0.1:{port} reuseport backlog=4096;\n")
    return conf / CONFIG.name


def nginx_env(redis_url: str, key: bytes) -> dict[str, str]:
    """The environment nginx.conf reads (``env``): where Redis is, the cookie key."""
    redis = Redis.from_url(redis_url).connection_pool.connection_kwargs
    return dict(
        os.environ,
        HB_COOKIE_KEY=key.decode(),
        HB_REDIS_HOST=str(redis.get("host", "127.0.0.1")),
        HB_REDIS_PORT=str(redis.get("port", 6379)),
        HB_REDIS_DB=str(redis.get("db", 0)),
    )


def check(prefix: Path, port: int, redis_url: str, key: bytes) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` of the shipped config laid out in ``prefix`` for ``port``."""
    nginx = nginx_binary()
    if nginx is None:
        raise RuntimeError("nginx with the Lua module is not installed")
    config = layout(prefix, port)
    return subprocess.run(
        [nginx, "-t", "-p", f"{prefix}/", "-c", str(config)],
        env=nginx_env(redis_url, key),
        capture_output=True,
        text=True,
        check=False,
    )


class OpenResty:
    """nginx in the foreground on ``port`` of 127.0.0.1, stopped on exit."""

    def __init__(self, prefix: Path, port: int, redis_url: str, key: bytes) -> None:
        self.prefix, self.port = prefix, port
        self.url = f"http://127.0.0.1:{port}"
        self._env = nginx_env(redis_url, key)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OpenResty:
        """Start nginx; RuntimeError (with its error log) if it does not answer."""
        nginx = nginx_binary()
        if nginx is None:
            raise RuntimeError("nginx with the Lua module is not installed")
        config = layout(self.prefix, self.port)
        logs = [self.prefix / "logs" / name for name in ("stderr.log", "error.log")]
        with open(logs[0], "wb") as out:
            self.proc = subprocess.Popen(
                [nginx, "-p", f"{self.prefix}/", "-c", str(config)],
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                errors = "".join(log.read_text() for log in logs if log.exists())
                raise RuntimeError(f"nginx did not start on port {self.port}: {errors}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop nginx (master and workers)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> OpenResty:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def unlist(redis: Redis, campaign_id: str) -> None:
    """Take a comparison campaign off the drainers' list: the comparison drains nothing,
    and our drainer must not spend the machine's CPU on its ledger (drainers let go of
    an unlisted stream at their next refresh, within 2 s)."""
    await redis.srem(CAMPAIGNS_SET, campaign_id)


@dataclass(frozen=True)
class Settlement:
    """What grab_envelope wrote for one campaign of the comparison."""

    count: int
    winners: int
    ledger: int
    taken: int
    won_count: int
    won_fen: int
    # Sum of the ledger's amounts, of the winners' amounts; openids in the ledger twice.
    ledger_fen: int
    winners_fen: int
    twice: int
    # Whether the ledger's entries are exactly the winners' envelopes.
    same_grants: bool

    @property
    def ok(self) -> bool:
        """winners == ledger entries == envelopes taken == won_count, nobody twice,
        the same amounts everywhere."""
        return (
            self.winners == self.ledger == self.taken == self.won_count
            and self.won_fen == self.ledger_fen == self.winners_fen
            and self.twice == 0
            and self.same_grants
        )


async def settlement(redis: Redis, campaign_id: str) -> Settlement:
    """Read back the campaign: winners hash, ledger stream, pool, meta counters, in one
    MULTI (nginx may still be settling the grabs in flight when wrk stops)."""
    keys = CampaignKeys.of(campaign_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.winners)
        pipe.xrange(keys.ledger)
        pipe.llen(keys.pool)
        pipe.hmget(keys.meta, ["count", "won_count", "won_fen"])
        raw, entries, left, meta = await pipe.execute()
    winners = {k.decode(): Envelope.decode(v) for k, v in raw.items()}
    grants = [
        record
        for raw_id, fields in entries
        if isinstance(record := LedgerEntry.of(campaign_id, raw_id, fields).decode(), GrabRecord)
    ]
    count, won_count, won_fen = (int(v or 0) for v in meta)
    by_player = Counter(g.openid for g in grants)
    return Settlement(
        count=count,
        winners=len(winners),
        ledger=len(entries),
        taken=count - int(left),
        won_count=won_count,
        won_fen=won_fen,
        ledger_fen=sum(g.amount_fen for g in grants),
        winners_fen=sum(e.amount_fen for e in winners.values()),
        twice=sum(1 for n in by_player.values() if n > 1),
        same_grants={g.openid: g.envelope for g in grants} == winners,
    )


async def discard(redis: Redis, campaign_id: str) -> None:
    """Remove a comparison campaign from Redis."""
    keys = CampaignKeys.of(campaign_id)
    await redis.delete(keys.meta, keys.pool, keys.winners, keys.ledger)
