"""Hostile input and abuse, through the real HAProxy in front of real worker processes.

One stack for the module: a private Redis, a PostgreSQL database of its own, the fake
WeChat, two workers with SESSION_KEYS, HAProxy with small limits and its log in a file.
Every limit is per client address, so each test speaks from its own loopback address
(127.0.0.N) and starts with fresh counters; the traffic is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml
from multidict import CIMultiDict
from redis.asyncio import Redis
from yarl import URL

from app.identity.sessions import Session, issue
from app.local.embedded import EmbeddedRedis, free_port
from app.local.haproxy import LOCAL_CONFIG, EdgeProxy, haproxy_binary, render_local_config
from app.store.scripts import SESSION_SIGNING_KEY, CampaignKeys, session_key
from app.web.accesslog import FLUSH_AFTER_S
from tests.conftest import ADMIN, PAGE, worker_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        haproxy_binary() is None, reason="haproxy not installed (.ci/run installs it)"
    ),
]

ROOT = Path(__file__).resolve().parent.parent
APPID = "wxhostile0123456"
SECRET = "hostile-secret-never-logged-42"
K1 = secrets.token_bytes(32)
K2 = secrets.token_bytes(32)
SESSION_TTL_S = 3600
# HAProxy's limits for this stack (production defaults are far higher).
SESSION_RATE = 20
CONN_CUR = 20
CONN_RATE = 60
LOGIN_RATE = 30
GLOBAL_MAXCONN = 60
FRONTEND_MAXCONN = 50
REQUEST_TIMEOUT_S = 3
SLOW_CLIENTS = 60


def _keys(*pairs: tuple[str, bytes]) -> str:
    return ",".join(f"{kid}:{base64.b64encode(key).decode()}" for kid, key in pairs)


@dataclass
class Stack:
    """The running processes of the module and where to reach them."""

    tmp: Path
    redis_url: str
    database_url: str
    fake_port: int = 0
    fake: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    worker_ports: dict[str, int] = field(default_factory=dict)
    edge: EdgeProxy | None = None
    stats_port: int = 0

    @property
    def port(self) -> int:
        assert self.edge is not None
        return self.edge.public_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_fake(self) -> None:
        self.fake_port = free_port()
        env = {**os.environ, "WECHAT_APPID": APPID, "WECHAT_SECRET": SECRET}
        out = open(self.tmp / "fake.log", "ab")  # noqa: SIM115 - owned by the child
        self.fake = subprocess.Popen(
            [sys.executable, "-m", "app", "fake-wechat", "--port", str(self.fake_port)],
            env=env,
            stdout=out,
            stderr=out,
        )
        out.close()
        _wait_port(self.fake_port)

    def start_workers(self, session_keys: str) -> None:
        for name in ("w1", "w2"):
            port = self.worker_ports.setdefault(name, free_port())
            env = worker_env(
                self.redis_url,
                self.database_url,
                port,
                DRAIN_DELAY_S="0.3",
                SHUTDOWN_TIMEOUT_S="5",
                SESSION_TTL_S=str(SESSION_TTL_S),
                SESSION_KEYS=session_keys,
                WECHAT_APPID=APPID,
                WECHAT_SECRET=SECRET,
                WECHAT_AUTHORIZE_URL=f"http://127.0.0.1:{self.fake_port}/connect/oauth2/authorize",
                WECHAT_API_BASE=f"http://127.0.0.1:{self.fake_port}",
            )
            out = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            self.workers[name] = subprocess.Popen(
                [sys.executable, "-m", "app", "worker"], env=env, stdout=out, stderr=out
            )
            out.close()
        for name, port in self.worker_ports.items():
            _wait_port(port, self.workers[name], self.tmp / f"{name}.log")

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart_workers(self, session_keys: str) -> None:
        """New worker processes with other SESSION_KEYS, on the same ports."""
        self.stop_workers()
        self.start_workers(session_keys)
        self.wait_all_up()

    def start_edge(self) -> None:
        config = self.tmp / "haproxy.cfg"
        config.write_text(
            render_local_config(LOCAL_CONFIG.read_text(), list(self.worker_ports.values()))
        )
        public = free_port()
        self.stats_port = free_port()
        env = {
            **os.environ,
            "HB_BIND": f"127.0.0.1:{public}",
            "HB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "HB_STATS_SOCKET": str(self.tmp / "haproxy.sock"),
            "HB_CHECK_INTER": "250ms",
            "HB_IP_RATE": "1000000",
            "HB_SESSION_RATE": str(SESSION_RATE),
            "HB_MAXCONN": str(GLOBAL_MAXCONN),
            "HB_FRONTEND_MAXCONN": str(FRONTEND_MAXCONN),
            "HB_CONN_CUR": str(CONN_CUR),
            "HB_CONN_RATE": str(CONN_RATE),
            "HB_LOGIN_RATE": str(LOGIN_RATE),
            "HB_REQUEST_TIMEOUT": f"{REQUEST_TIMEOUT_S}s",
        }
        self.edge = EdgeProxy(config, public, env).start(self.tmp / "haproxy.log")

    def wait_all_up(self, timeout: float = 60) -> None:
        """Until HAProxy's health checks see every worker UP."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(self.tmp / "haproxy.sock"))
                sock.sendall(b"show stat\n")
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
            rows = [line.split(",") for line in raw.decode().splitlines()[1:] if line]
            statuses = [r[17] for r in rows if r[0] == "workers" and r[1] in self.workers]
            if len(statuses) == len(self.workers) and all(s == "UP" for s in statuses):
                return
            time.sleep(0.1)
        raise RuntimeError("workers not UP behind HAProxy")

    def logs(self) -> str:
        """Everything every process of the stack has written."""
        return "\n".join(
            path.read_text(errors="replace") for path in sorted(self.tmp.glob("*.log"))
        )

    def stop(self) -> None:
        self.stop_workers()
        if self.edge is not None:
            self.edge.stop(timeout=5)
        if self.fake is not None:
            self.fake.terminate()
            self.fake.wait(timeout=10)


def _wait_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited: {log.read_text() if log else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing on port {port}")


async def _create_database(database_url: str, name: str, *, drop: bool = False) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}" if drop else f"CREATE DATABASE {name}")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Stack]:
    """The module's HAProxy, workers, fake WeChat, Redis and database; stopped after."""
    tmp = tmp_path_factory.mktemp("hostile")
    redis_server = EmbeddedRedis(tmp / "redis-data", free_port()).start()
    db_name = f"hb_hostile_{secrets.token_hex(4)}"
    asyncio.run(_create_database(database_url, db_name))
    topo = Stack(tmp, redis_server.url, str(URL(database_url).with_path(f"/{db_name}")))
    try:
        topo.start_fake()
        topo.start_workers(_keys(("k1", K1)))
        topo.start_edge()
        topo.wait_all_up()
        yield topo
    finally:
        topo.stop()
        redis_server.stop()
        asyncio.run(_create_database(database_url, db_name, drop=True))


def _client(n: int) -> aiohttp.ClientSession:
    """A client speaking from 127.0.0.``n``, without a cookie jar."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=8, local_addr=(f"127.0.0.{n}", 0)),
        headers=PAGE,
    )


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    """A client on the stack's Redis."""
    client = Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


async def _campaign(http: aiohttp.ClientSession, url: str, count: int = 10) -> str:
    body = {"kind": "red_packet", "name": "hostile", "total_fen": 100 * count, "count": count}
    async with http.post(f"{url}/api/admin/campaigns", json=body, headers=ADMIN) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["id"])


async def _login(http: aiohttp.ClientSession, url: str, openid: str) -> str:
    async with http.post(f"{url}/auth/dev-login", json={"openid": openid}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.cookies["hb_session"].value


def _is_json_error(status: int, headers: Any, body: bytes) -> bool:
    if status < 400 or not headers.get("Content-Type", "").startswith("application/json"):
        return False
    data = orjson.loads(body)
    return isinstance(data, dict) and isinstance(data.get("error"), str) and bool(data["message"])


# --- 1. one identity per request -------------------------------------------------------


async def test_duplicate_session_cookie_is_refused_not_a_rate_limit_bypass(
    stack: Stack, redis: Redis
) -> None:
    async with _client(3) as http:
        cid = await _campaign(http, stack.url)
        token = await _login(http, stack.url, "doubler")
        other = await _login(http, stack.url, "victim")
        url = f"{stack.url}/api/campaigns/{cid}/me"
        doubled = [
            {"Cookie": f"hb_session={token}; hb_session={secrets.token_urlsafe(30)}"},
            {"Cookie": f"hb_session={secrets.token_urlsafe(30)}; hb_session={token}"},
            {"Cookie": f"hb_session={token}; hb_session={other}"},
            CIMultiDict([("Cookie", f"hb_session={token}"), ("Cookie", f"hb_session={other}")]),
        ]
        for i in range(2 * SESSION_RATE):
            async with http.get(url, headers=doubled[i % len(doubled)]) as resp:
                body = await resp.read()
                assert resp.status == 400, body
                assert _is_json_error(resp.status, resp.headers, body)
                assert orjson.loads(body)["error"] == "bad_request"
        # The worker refuses too, when reached without HAProxy.
        direct = f"http://127.0.0.1:{stack.worker_ports['w1']}/api/campaigns/{cid}/me"
        async with http.get(direct, headers=doubled[0]) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "bad_request"
        # The one cookie is limited exactly as before: the doubled requests did not
        # count against it nor bypass it.
        statuses = []
        for _ in range(SESSION_RATE + 10):
            async with http.get(url, headers={"Cookie": f"hb_session={token}"}) as resp:
                statuses.append(resp.status)
        assert statuses == [200] * SESSION_RATE + [429] * 10


async def test_no_cookie_spelling_gets_past_the_per_session_limit(stack: Stack) -> None:
    """Whatever way the one real token is written, it is refused or counted: never more
    than SESSION_RATE answers in the window."""
    async with _client(18) as http:
        cid = await _campaign(http, stack.url)
        token = await _login(http, stack.url, "speller")
        junk = secrets.token_urlsafe(30)
        spellings: list[Any] = [
            {"Cookie": f"hb_session={token}"},
            {"Cookie": f"hb_session={token}, hb_session={junk}"},
            {"Cookie": f"hb_session={junk}, hb_session={token}"},
            {"Cookie": f"hb_session ={token}"},
            {"Cookie": f"hb_session=\t{token}"},
            {"Cookie": f'hb_session="{token}"'},
            {"Cookie": f"x=1;hb_session={token};y=2"},
            {"Cookie": f"HB_SESSION={junk}; hb_session={token}"},
            CIMultiDict([("Cookie", "a=b"), ("Cookie", f"hb_session={token}")]),
        ]
        answered = 0
        for i in range(3 * SESSION_RATE):
            url = f"{stack.url}/api/campaigns/{cid}/me"
            async with http.get(url, headers=spellings[i % len(spellings)]) as resp:
                body = await resp.read()
                assert resp.status in {200, 400, 401, 429}, body
                assert resp.status == 200 or _is_json_error(resp.status, resp.headers, body)
                answered += resp.status == 200
        assert 0 < answered <= SESSION_RATE


# --- 2. connection-level defences ------------------------------------------------------


def _slow_client(source: str, port: int) -> socket.socket:
    """A connection that starts a request and never finishes it."""
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: hongbao\r\nX-Slow: ")
    except OSError:
        pass  # refused: what it reads is b""
    return sock


def _answer_of(sock: socket.socket) -> bytes:
    """What the server sends before closing (b"" for a refused connection)."""
    raw = b""
    try:
        while chunk := sock.recv(65536):
            raw += chunk
    except OSError:
        pass
    return raw


async def test_slow_clients_from_one_address_do_not_starve_health_or_grabs(
    stack: Stack, redis: Redis
) -> None:
    async with _client(5) as http:
        cid = await _campaign(http, stack.url, count=5)
        token = await _login(http, stack.url, "patient")
    slow = [_slow_client("127.0.0.2", stack.port) for _ in range(SLOW_CLIENTS)]
    try:
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=2)
        async with _client(5) as http:
            async with http.get(f"{stack.url}/healthz", timeout=timeout) as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{stack.stats_port}/healthz") as resp:
                assert resp.status == 200  # HAProxy's own monitor-uri
            async with http.post(
                f"{stack.url}/api/campaigns/{cid}/grab",
                headers={"Cookie": f"hb_session={token}"},
                timeout=timeout,
            ) as resp:
                assert resp.status == 200
                won = await resp.json()
        assert time.monotonic() - started < REQUEST_TIMEOUT_S, "answered only after the timeout"
        assert won["result"] == "won"
        winners = await redis.hgetall(CampaignKeys.of(cid).winners)
        assert list(winners) == [b"patient"]
        assert int(winners[b"patient"].rsplit(b":", 1)[1]) == won["amount_fen"]
        answers = await asyncio.gather(*(asyncio.to_thread(_answer_of, s) for s in slow))
    finally:
        for sock in slow:
            sock.close()
    # CONN_CUR connections were let in and told 408 (JSON) after HB_REQUEST_TIMEOUT;
    # every other one was refused before a byte of HTTP.
    timed_out = [a for a in answers if a]
    assert len(timed_out) == CONN_CUR
    assert all(_parse(a)[0] == 408 for a in timed_out)
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 3


async def test_connection_rate_per_address_is_bounded(stack: Stack) -> None:
    def one(_: int) -> bytes:
        with socket.socket() as sock:
            sock.settimeout(5)
            sock.bind(("127.0.0.9", 0))
            try:
                sock.connect(("127.0.0.1", stack.port))
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            except OSError:
                return b""
            return _answer_of(sock)

    answers = [await asyncio.to_thread(one, i) for i in range(CONN_RATE + 20)]
    answered = [a for a in answers if a.startswith(b"HTTP/1.1 200")]
    assert len(answered) == CONN_RATE
    assert all(not a for a in answers[CONN_RATE:])
    # Another address is not affected.
    async with _client(10) as http, http.get(f"{stack.url}/healthz") as resp:
        assert resp.status == 200


# --- 3. login state bounded ------------------------------------------------------------


async def test_login_start_flood_is_limited_and_redis_stays_bounded(
    stack: Stack, redis: Redis
) -> None:
    flood = 2000
    login = f"{stack.url}/auth/wechat/login"
    # Both workers' Redis connections exist before the memory is measured.
    async with _client(16) as http:
        for _ in range(4):
            async with http.get(login, allow_redirects=False) as resp:
                assert resp.status == 302
    keys_before = set(await redis.keys("hb:login:*"))
    before = int((await redis.info("memory"))["used_memory"])
    statuses = []
    async with _client(4) as http:
        for _ in range(flood):
            async with http.get(f"{login}?next=/c/abc", allow_redirects=False) as resp:
                body = await resp.read()
                statuses.append(resp.status)
                if resp.status == 429:
                    assert _is_json_error(resp.status, resp.headers, body)
                    assert orjson.loads(body)["error"] == "rate_limited"
                    assert resp.headers["Retry-After"] == "60"
    assert statuses == [302] * LOGIN_RATE + [429] * (flood - LOGIN_RATE)
    grown = int((await redis.info("memory"))["used_memory"]) - before
    keys = set(await redis.keys("hb:login:*")) - keys_before
    assert len(keys) == LOGIN_RATE
    # Only what the callback needs: a 128-bit browser digest and the path back.
    sizes = [int(await redis.memory_usage(k) or 0) for k in keys]
    assert max(sizes) <= 160, sizes
    assert all(0 < ttl <= 300 for ttl in [await redis.ttl(k) for k in keys])
    for key in keys:
        assert set(await redis.hkeys(key)) == {b"b", b"next"}
    print(f"login state: {max(sizes)} B per key, used_memory +{grown} B for {flood} starts")
    # Unlimited, the flood would hold flood x ~275 B (used_memory per login start), over
    # 500 KB; limited, 30 logins and what else the workers' connections hold meanwhile.
    assert sum(sizes) <= LOGIN_RATE * 160
    assert grown < 256 * 1024
    # Another address may still start a login.
    async with _client(11) as http, http.get(login, allow_redirects=False) as resp:
        assert resp.status == 302


def _proxied_login_start(port: int, source: str) -> int:
    """One login start as if from ``source`` (an IPv6 address), told through the PROXY
    protocol; the status."""
    request = (
        f"PROXY TCP6 {source} ::1 40000 80\r\n"
        "GET /auth/wechat/login HTTP/1.1\r\nHost: hongbao\r\nConnection: close\r\n\r\n"
    ).encode()
    return _raw(port, request, source="127.0.0.17")[0]


async def test_login_limit_counts_an_ipv6_slash_64_as_one_client(stack: Stack) -> None:
    """Loopback has one IPv6 address, so a second HAProxy (the same config, its public
    bind taking the PROXY protocol) is told the client addresses."""
    config = stack.tmp / "haproxy-proxied.cfg"
    rendered = (stack.tmp / "haproxy.cfg").read_text()
    bind = '    bind "${HB_BIND-127.0.0.1:8080}"\n'
    assert rendered.count(bind) == 1
    config.write_text(rendered.replace(bind, bind.rstrip("\n") + " accept-proxy\n"))
    assert stack.edge is not None
    port = free_port()
    env = {
        **stack.edge.env,
        "HB_BIND": f"127.0.0.1:{port}",
        "HB_STATS_BIND": f"127.0.0.1:{free_port()}",
        "HB_STATS_SOCKET": str(stack.tmp / "haproxy-proxied.sock"),
    }
    edge = EdgeProxy(config, port, env).start(stack.tmp / "haproxy-proxied.log")
    try:
        same = ["2001:db8:1:2::a", "2001:db8:1:2:ffff:1:2:3"]
        statuses = [
            await asyncio.to_thread(_proxied_login_start, port, same[i % 2])
            for i in range(LOGIN_RATE + 10)
        ]
        # Two addresses of one /64 share the limit ...
        assert statuses == [302] * LOGIN_RATE + [429] * 10
        # ... another /64 has its own.
        assert await asyncio.to_thread(_proxied_login_start, port, "2001:db8:1:3::a") == 302
    finally:
        edge.stop(timeout=5)


# --- 4. session keys outside the data store --------------------------------------------


async def _me(http: aiohttp.ClientSession, url: str, cid: str, token: str) -> int:
    async with http.get(
        f"{url}/api/campaigns/{cid}/me", headers={"Cookie": f"hb_session={token}"}
    ) as resp:
        await resp.read()
        return resp.status


async def test_tokens_not_signed_by_session_keys_or_too_long_lived_are_refused(
    stack: Stack, redis: Redis
) -> None:
    async with _client(6) as http:
        cid = await _campaign(http, stack.url)
        honest = await _login(http, stack.url, "honest")
        assert honest.split(".")[4] == "k1"
        assert await _me(http, stack.url, cid, honest) == 200
        # With SESSION_KEYS set nothing is shared through Redis.
        assert await redis.get(SESSION_SIGNING_KEY) is None
        # What an attacker with Redis read (even write) access could mint: the key found
        # in Redis, under either key id, and a session record to match.
        stolen = secrets.token_bytes(32)
        await redis.set(SESSION_SIGNING_KEY, stolen)
        now = int(time.time())
        forged = []
        for kid in ("r", "k1"):
            sid, token = issue(stolen, Session("alice"), now + 3600, kid)
            await redis.set(session_key(sid), Session("alice").to_json(), ex=3600)
            forged.append(token)
        # The real key, a session that exists, a ten-year expiry (a backup's key).
        sid, ten_years = issue(K1, Session("alice"), now + 10 * 365 * 86400, "k1")
        await redis.set(session_key(sid), Session("alice").to_json(), ex=3600)
        forged.append(ten_years)
        # The real key, but no such session in Redis.
        forged.append(issue(K1, Session("alice"), now + 3600, "k1")[1])
        for token in forged:
            for _ in range(2):  # each worker, by leastconn
                assert await _me(http, stack.url, cid, token) == 401, token
        assert await _me(http, stack.url, cid, honest) == 200
        await redis.delete(SESSION_SIGNING_KEY)


async def test_session_key_rotation(stack: Stack) -> None:
    async with _client(7) as http:
        cid = await _campaign(http, stack.url)
        old = await _login(http, stack.url, "rotating")
        try:
            stack.restart_workers(_keys(("k2", K2), ("k1", K1)))
            for _ in range(2):
                assert await _me(http, stack.url, cid, old) == 200
            new = await _login(http, stack.url, "rotating")
            assert new.split(".")[4] == "k2"
            stack.restart_workers(_keys(("k2", K2)))
            for _ in range(2):
                assert await _me(http, stack.url, cid, old) == 401
                assert await _me(http, stack.url, cid, new) == 200
        finally:
            stack.restart_workers(_keys(("k1", K1)))


# --- 5. every error is JSON, from every layer ------------------------------------------


def _raw(port: int, request: bytes, source: str = "") -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; the status, headers and body of the answer.

    Unless told, each request comes from a loopback address of its own (derived from
    it), so that the per-address connection limits never refuse a table's cases.
    """
    digest = hashlib.sha256(request).digest()
    source = source or f"127.{100 + digest[0] % 100}.{digest[1]}.{1 + digest[2] % 250}"
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        # It may be answered and closed before all of it is read.
        with contextlib.suppress(OSError):
            sock.sendall(request)
        raw = b""
        while True:
            head, sep, rest = raw.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length and len(rest) >= int(length.group(1)):
                    break
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            raw += chunk
    return _parse(raw)


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), raw
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().title()] = value.strip()
    return int(lines[0].split()[1]), headers, body


H = b"Host: hongbao\r\nConnection: close\r\n"
# HAProxy before 3.2 answers what its parser refuses in a request head, and a request
# head that does not arrive within `timeout http-request`, with built-in HTML pages:
# `http-error` and `errorfile` shape every answer made once a request is parsed, not
# those (haproxy/haproxy#3032). Required all the same, expected to fail on older ones.
HAPROXY_VERSION = tuple(
    int(part)
    for part in re.findall(
        r"version (\d+)\.(\d+)",
        subprocess.run(
            [haproxy_binary() or "haproxy", "-v"], capture_output=True, text=True, check=False
        ).stdout
        if haproxy_binary()
        else "version 0.0",
    )[0]
)
PARSER_PAGES = pytest.mark.xfail(
    HAPROXY_VERSION < (3, 2),
    reason="HAProxy < 3.2 answers its parser's errors with built-in HTML (haproxy#3032)",
    strict=True,
)


def _case(name: str, request: bytes, refused_by: str) -> Any:
    marks = [PARSER_PAGES] if refused_by == "haproxy" else []
    return pytest.param(request, refused_by, id=name, marks=marks)


# (name, request, who refuses it: HAProxy's parser, the worker, or nobody: it is valid)
MALFORMED = [
    _case("not http", b"HELLO\r\n\r\n", "haproxy"),
    _case("bad method", b"G\x01T / HTTP/1.1\r\n" + H + b"\r\n", "haproxy"),
    _case("fragment in path", b"GET /api/campaigns/x#y HTTP/1.1\r\n" + H + b"\r\n", "haproxy"),
    _case("non-utf8 path", b"GET /api/campaigns/\xff\xfe HTTP/1.1\r\n" + H + b"\r\n", "haproxy"),
    _case("space in path", b"GET /api/cam paigns HTTP/1.1\r\n" + H + b"\r\n", "haproxy"),
    _case("nul in path", b"GET /api/\x00 HTTP/1.1\r\n" + H + b"\r\n", "haproxy"),
    _case("unknown version", b"GET / HTTP/7.1\r\n" + H + b"\r\n", "haproxy"),
    _case(
        "headers too large",
        b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n",
        "haproxy",
    ),
    _case(
        "too many headers",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
        "haproxy",
    ),
    _case("bad header name", b"GET /healthz HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n", "haproxy"),
    _case(
        "bad chunk size",
        b"POST /auth/dev-login HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        "haproxy",
    ),
    _case(
        "chunk longer than said",
        b"POST /auth/dev-login HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}xx\r\n0\r\n\r\n",
        "haproxy",
    ),
    _case(
        "length and chunked",
        b"POST /auth/dev-login HTTP/1.1\r\n"
        + H
        + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "worker",
    ),
    _case(
        "two lengths",
        b"POST /auth/dev-login HTTP/1.1\r\n"
        + H
        + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "haproxy",
    ),
    _case(
        "negative length",
        b"POST /auth/dev-login HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
        "haproxy",
    ),
    _case(
        "header line too large for the worker",
        b"GET /healthz HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 10000 + b"\r\n\r\n",
        "worker",
    ),
    _case(
        "body too large",
        b"POST /auth/dev-login HTTP/1.1\r\n" + H + b"Content-Length: 70000\r\n\r\n" + b"a" * 70000,
        "worker",
    ),
    _case(
        "non-utf8 body",
        b"POST /auth/dev-login HTTP/1.1\r\n"
        + H
        + b"Content-Type: application/json\r\nX-Requested-With: hongbao\r\n"
        + b'Content-Length: 14\r\n\r\n{"openid":"\xff"}',
        "worker",
    ),
    _case(
        "non-utf8 header value",
        b"GET /healthz HTTP/1.1\r\n" + H + b"X-Odd: \xff\xfe\r\n\r\n",
        "nobody",
    ),
    _case("non-utf8 query", b"GET /api/campaigns/x?y=\xff HTTP/1.1\r\n" + H + b"\r\n", "haproxy"),
]


@pytest.mark.parametrize(("request_bytes", "refused_by"), MALFORMED)
def test_malformed_http_through_haproxy_gets_json(
    stack: Stack, request_bytes: bytes, refused_by: str
) -> None:
    status, headers, body = _raw(stack.port, request_bytes)
    assert status < 500, (status, body)
    if refused_by != "nobody":
        assert 400 <= status < 500, (status, body)
    if status >= 400:
        assert _is_json_error(status, headers, body), (status, headers, body)


@pytest.mark.parametrize(
    ("request_bytes", "refused_by"),
    [pytest.param(p.values[0], "worker", id=p.id) for p in MALFORMED if p.values[1] != "nobody"],
)
def test_malformed_http_straight_to_a_worker_gets_json(
    stack: Stack, request_bytes: bytes, refused_by: str
) -> None:
    """What HAProxy lets through (or a worker reached without it) is refused in JSON by
    aiohttp's parser."""
    status, headers, body = _raw(stack.worker_ports["w1"], request_bytes)
    assert 400 <= status < 500, (status, body)
    assert _is_json_error(status, headers, body), (status, headers, body)


@PARSER_PAGES
def test_request_head_timeout_is_answered_in_json(stack: Stack) -> None:
    sock = _slow_client("127.0.0.15", stack.port)
    with sock:
        status, headers, body = _parse(_answer_of(sock))
    assert status == 408
    assert _is_json_error(status, headers, body), (headers, body)


async def test_a_worker_answering_garbage_is_a_json_502(stack: Stack) -> None:
    """HAProxy's own answer when a server breaks the protocol: a second HAProxy (the
    same config, unchecked) in front of a server that answers junk."""

    async def junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Closed whatever the peer does (HAProxy may hang up first): a writer left to the
        # garbage collector warns in whichever later test collects it.
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 2 junk\r\nContent-Length: x\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(junk, "127.0.0.1", 0)
    junk_port = server.sockets[0].getsockname()[1]
    config = stack.tmp / "haproxy-junk.cfg"
    rendered = render_local_config(LOCAL_CONFIG.read_text(), [junk_port])
    config.write_text(rendered.replace("    default-server check ", "    default-server "))
    assert stack.edge is not None
    port = free_port()
    env = {
        **stack.edge.env,
        "HB_BIND": f"127.0.0.1:{port}",
        "HB_STATS_BIND": f"127.0.0.1:{free_port()}",
        "HB_STATS_SOCKET": str(stack.tmp / "haproxy-junk.sock"),
    }
    edge = EdgeProxy(config, port, env).start(stack.tmp / "haproxy-junk.log")
    try:
        async with _client(19) as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            body = await resp.read()
            assert resp.status == 502, body
            assert _is_json_error(resp.status, resp.headers, body)
            assert orjson.loads(body)["error"] == "bad_gateway"
    finally:
        edge.stop(timeout=5)
        server.close()
        await server.wait_closed()


ODD_BYTES = [b"\xff\xfe", b"\xc3\x28", b"caf\xc3\xa9", b"\x80"]


@pytest.mark.parametrize(
    "odd", ODD_BYTES, ids=["ff-fe", "bad-utf8", "utf8-e-acute", "lone-continuation"]
)
def test_odd_bytes_in_authorization_on_admin_routes(stack: Stack, odd: bytes) -> None:
    for port in (stack.port, stack.worker_ports["w2"]):
        for request in [
            b"GET /api/admin/campaigns/0000000000000000 HTTP/1.1\r\n",
            b"POST /api/admin/campaigns HTTP/1.1\r\nContent-Length: 2\r\n",
        ]:
            status, headers, body = _raw(
                port,
                request
                + H
                + b"Authorization: Bearer "
                + odd
                + b"\r\n\r\n"
                + (b"{}" if request.startswith(b"POST") else b""),
            )
            assert status == 401, body
            assert orjson.loads(body)["error"] == "unauthenticated"
            assert headers["Content-Type"].startswith("application/json")


ROUTES = [
    b"GET /healthz",
    b"GET /",
    b"GET /c/0000000000000000",
    b"GET /auth/wechat/login?next=/",
    b"GET /auth/wechat/callback?code=c&state=s",
    b"GET /api/campaigns/0000000000000000",
    b"POST /api/campaigns/0000000000000000/grab",
    b"POST /api/campaigns/0000000000000000/draw",
    b"POST /auth/dev-login",
    b"POST /auth/logout",
    b"GET /api/admin/campaigns/0000000000000000",
]
HEADERS = [
    "Host",
    "Origin",
    "Referer",
    "Cookie",
    "X-Requested-With",
    "Content-Type",
    "Accept",
    "Accept-Language",
    "User-Agent",
    "Idempotency-Key",
    "X-Forwarded-For",
    "If-None-Match",
]


@pytest.mark.parametrize("header", HEADERS)
def test_odd_bytes_in_any_header_never_a_5xx_nor_a_bare_error(stack: Stack, header: str) -> None:
    for port in (stack.port, stack.worker_ports["w1"]):
        for route in ROUTES:
            for odd in (b"\xff\xfe", b"caf\xc3\xa9", b"\x80"):
                value = b"v" + odd
                lines = [route + b" HTTP/1.1"]
                lines.append(b"Host: " + (value if header == "Host" else b"hongbao"))
                if header == "Cookie":
                    lines.append(b"Cookie: hb_session=" + value + b"; hb_login=" + value)
                elif header != "Host":
                    lines.append(header.encode() + b": " + value)
                body = b"{}" if route.startswith(b"POST") else b""
                lines += [b"Connection: close", b"Content-Length: %d" % len(body)]
                status, headers, answer = _raw(port, b"\r\n".join(lines) + b"\r\n\r\n" + body)
                assert status < 500, (port, route, odd, answer)
                if status >= 400 and not answer.startswith(b"<!doctype html>"):
                    # Only the WeChat callback answers browsers with an HTML page.
                    assert _is_json_error(status, headers, answer), (route, odd, answer)


async def test_odd_request_id_never_hides_a_settled_grab(stack: Stack, redis: Redis) -> None:
    async with _client(12) as http:
        cid = await _campaign(http, stack.url, count=len(ODD_BYTES) * 2)
        tokens = [await _login(http, stack.url, f"rid{i}") for i in range(len(ODD_BYTES) * 2)]
    told: dict[str, int] = {}
    for i, token in enumerate(tokens):
        port = stack.port if i % 2 else stack.worker_ports["w1"]
        odd = ODD_BYTES[i // 2]
        status, headers, body = _raw(
            port,
            f"POST /api/campaigns/{cid}/grab HTTP/1.1\r\n".encode()
            + H
            + f"Cookie: hb_session={token}\r\nX-Requested-With: hongbao\r\n".encode()
            + b"X-Request-ID: trace-"
            + odd
            + b"\r\nContent-Length: 0\r\n\r\n",
            source="127.0.0.12",
        )
        assert status == 200, body
        answer = orjson.loads(body)
        assert answer["result"] == "won"
        told[f"rid{i}"] = answer["amount_fen"]
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", headers["X-Request-Id"])
    winners = await redis.hgetall(CampaignKeys.of(cid).winners)
    assert {k.decode(): int(v.rsplit(b":", 1)[1]) for k, v in winners.items()} == told
    assert sum(told.values()) == 100 * len(tokens)


BAD_DEFINITIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "nul in name",
        {"kind": "red_packet", "name": "红\x00包", "total_fen": 100, "count": 1},
        "name",
    ),
    (
        "nul in tier name",
        {
            "kind": "lottery",
            "name": "抽奖",
            "tiers": [{"name": "一等\x00奖", "value_fen": 100, "stock": 1, "weight": 1}],
        },
        "tiers",
    ),
    (
        "starts before year 1 in UTC",
        {
            "kind": "red_packet",
            "name": "早",
            "total_fen": 100,
            "count": 1,
            "starts_at": "0001-01-01T00:00:00+08:00",
        },
        "starts_at",
    ),
    (
        "ends after year 9999 in UTC",
        {
            "kind": "red_packet",
            "name": "晚",
            "total_fen": 100,
            "count": 1,
            "ends_at": "9999-12-31T23:00:00-08:00",
        },
        "ends_at",
    ),
]


@pytest.mark.parametrize(
    ("body", "field"), [b[1:] for b in BAD_DEFINITIONS], ids=[b[0] for b in BAD_DEFINITIONS]
)
async def test_unstorable_names_and_times_are_422(
    stack: Stack, redis: Redis, body: dict[str, Any], field: str
) -> None:
    before = await redis.scard("hb:campaigns")
    url = f"{stack.url}/api/admin/campaigns"
    async with _client(13) as http, http.post(url, json=body, headers=ADMIN) as resp:
        data = await resp.json()
        assert resp.status == 422, data
        assert data["error"] == "invalid"
        assert str(data["field"]).startswith(field)
    assert await redis.scard("hb:campaigns") == before


# --- 6. no secrets or OAuth codes in any log -------------------------------------------


async def test_full_login_leaves_no_code_or_state_in_any_log(stack: Stack) -> None:
    async with _client(14) as http:
        async with http.get(f"{stack.url}/auth/wechat/login?next=/", allow_redirects=False) as resp:
            assert resp.status == 302
            authorize = URL(resp.headers["Location"])
            login_cookie = resp.cookies["hb_login"].value
        state = authorize.query["state"]
        async with http.get(
            authorize.update_query(fake_openid="logged-in-quietly"), allow_redirects=False
        ) as resp:
            assert resp.status == 302
            callback = URL(resp.headers["Location"])
        code = callback.query["code"]
        assert callback.query["state"] == state
        assert callback.port == stack.port
        async with http.get(
            callback, headers={"Cookie": f"hb_login={login_cookie}"}, allow_redirects=False
        ) as resp:
            assert resp.status == 302, await resp.text()
            token = resp.cookies["hb_session"].value
        cid = await _campaign(http, stack.url)
        assert await _me(http, stack.url, cid, token) == 200
    # Callbacks aiohttp's parser refuses (HAProxy would refuse the first itself): its
    # error message quotes the offending line, which must not reach the log.
    leaked = secrets.token_hex(16)
    for port in stack.worker_ports.values():
        for bad in [
            f"GET /auth/wechat/callback?code={leaked}&state={leaked}&x=".encode() + b"\xff",
            f"GET /auth/wechat/callback?code={leaked}&state={leaked}#frag".encode(),
        ]:
            status, _, _ = _raw(port, bad + b" HTTP/1.1\r\n" + H + b"\r\n")
            assert status == 400
    await asyncio.sleep(FLUSH_AFTER_S * 4)
    # HAProxy wrote the callback's line (without its query), and every log is free of
    # the code, the state, the secret and the session token.
    deadline = time.monotonic() + 5
    while "/auth/wechat/callback" not in (stack.tmp / "haproxy.log").read_text():
        assert time.monotonic() < deadline, "HAProxy never logged the callback"
        await asyncio.sleep(0.1)
    logs = stack.logs()
    for secret in (code, state, SECRET, token, login_cookie, leaked):
        assert secret not in logs


def test_every_deployment_sets_public_base_url_and_session_keys() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-app-settings"]["PUBLIC_BASE_URL"]
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/10-config.yaml").read_text()) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["PUBLIC_BASE_URL"].startswith("https://")
    secret = next(d for d in docs if d["kind"] == "Secret")["stringData"]
    assert "SESSION_KEYS" in secret
