"""Property-based fuzzing of the running stack from its own OpenAPI document.

Schemathesis reads GET /api/openapi.json through HAProxy, in front of two worker
processes on the test Redis and PostgreSQL, and sends requests made from the document's
schemas (valid ones, and ones the schemas reject) to every operation: bounded to a fixed
number of examples per operation, a per-request timeout and a wall-clock limit on the
run. It checks that nothing answers 5xx, that every status, media type and body is one
the document lists, and that what the schemas reject is refused. Afterwards the money
still adds up and every worker is still serving.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from app.local.embedded import free_port
from app.local.fakewechatpay import start_fake_wechatpay
from app.local.haproxy import LOCAL_CONFIG, EdgeProxy, haproxy_binary, render_local_config
from app.records import Envelope
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN, ADMIN_TOKEN, PAGE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        haproxy_binary() is None, reason="haproxy not installed (.ci/run installs it)"
    ),
]

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "response_headers_conformance",
    "unsupported_method",
    "allow_header_conformance",
    "missing_required_header",
)
MAX_EXAMPLES = 100
SEED = 20270209
REQUEST_TIMEOUT_S = 10
RUN_TIMEOUT_S = 420
WORKERS = 2
# Caps the envelope count of the red packets the fuzzer creates.
HOOKS = Path(__file__).with_name("fuzz_hooks.py")
WECHAT = {"WECHAT_APPID": "wxfuzz0000000001", "WECHAT_SECRET": "fuzz-secret"}


@dataclass
class Stack:
    """HAProxy in front of worker processes, all on the test stores."""

    tmp: Path
    redis_url: str
    database_url: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    edge: EdgeProxy | None = None
    fakes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.edge is not None
        return f"http://127.0.0.1:{self.edge.public_port}"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "app", *args], env=env, stdout=out, stderr=out
            )

    def start(self) -> None:
        public = free_port()
        # WeChat and WeChat Pay are the outside services: fakes speaking their wire formats.
        wechat = free_port()
        self.fakes.append(
            self._spawn("wechat", ["fake-wechat", "--port", str(wechat)], {**os.environ, **WECHAT})
        )
        # WeChat Pay notifies through HAProxy, as it would in production.
        pay = {**os.environ, **WECHAT, "PORT": str(public)}
        fake_pay = start_fake_wechatpay(pay, self.tmp)
        assert fake_pay is not None
        self.fakes.append(fake_pay)
        ports = [free_port() for _ in range(WORKERS)]
        for n, port in enumerate(ports):
            env = {
                **pay,
                "WECHAT_AUTHORIZE_URL": f"http://127.0.0.1:{wechat}/connect/oauth2/authorize",
                "WECHAT_API_BASE": f"http://127.0.0.1:{wechat}",
                "REDIS_URL": self.redis_url,
                "DATABASE_URL": self.database_url,
                "ADMIN_TOKEN": ADMIN_TOKEN,
                "DEV_LOGIN": "1",
                "INSECURE_COOKIES": "1",
                "HOST": "127.0.0.1",
                "PORT": str(port),
            }
            self.workers.append(self._spawn(f"w{n}", ["worker"], env))
        config = self.tmp / "haproxy.cfg"
        config.write_text(render_local_config(LOCAL_CONFIG.read_text(), ports))
        env = {
            **os.environ,
            "HB_BIND": f"127.0.0.1:{public}",
            "HB_STATS_BIND": f"127.0.0.1:{free_port()}",
            "HB_STATS_SOCKET": str(self.tmp / "haproxy.sock"),
            "HB_CHECK_INTER": "250ms",
            # All the fuzzer's requests share one address and one session: lift the
            # limits that would otherwise answer most of them 429.
            "HB_IP_RATE": "1000000",
            "HB_SESSION_RATE": "1000000",
        }
        self.edge = EdgeProxy(config, public, env).start(self.tmp / "haproxy.log")
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every worker answers /readyz through HAProxy (bounded)."""
        deadline = time.monotonic() + timeout
        ready = 0
        while ready < 2 * WORKERS:
            for n, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    raise RuntimeError((self.tmp / f"w{n}.log").read_text())
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    ready += resp.status == 200
            except OSError:
                ready = 0
            if time.monotonic() > deadline:
                raise RuntimeError("the stack did not become ready")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.edge is not None:
            self.edge.stop(timeout=5)
        for fake in self.fakes:
            fake.terminate()
            fake.wait(timeout=10)


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, database_url: str, clean: None) -> Iterator[Stack]:
    running = Stack(tmp_path, redis_url, database_url)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _post(url: str, body: object, headers: dict[str, str]) -> tuple[int, dict[str, object], str]:
    """POST JSON; the status, the body and the session cookie set, if any."""
    request = urllib.request.Request(
        url,
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", **PAGE, **headers},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        cookie = resp.headers.get("Set-Cookie", "")
        return resp.status, orjson.loads(resp.read()), cookie.split(";")[0]


def _assets(url: str) -> list[str]:
    """The public names of the page's assets, as the page links them."""
    with urllib.request.urlopen(f"{url}/", timeout=10) as resp:
        return re.findall(r'/static/([^"]+)"', resp.read().decode())


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


def _config(path: Path, campaigns: list[str], assets: list[str], logout_cookie: str) -> None:
    """schemathesis.toml: real campaign ids and asset names, and what each operation may do."""
    path.write_text(
        f"""
hooks = "{HOOKS}"

[generation]
database = "none"
# The session travels in the Cookie header given on the command line: a second,
# generated hb_session cookie would only be refused as a duplicate.
with-security-parameters = false

[dictionaries.campaigns]
values = {_toml_list(campaigns)}

[dictionaries.assets]
values = {_toml_list(assets)}

[parameters]
"path.id" = {{ dictionary = "campaigns", probability = 0.7 }}
"path.name" = {{ dictionary = "assets", probability = 0.7 }}

# HAProxy answers 404 to /metrics for any method: the workers' metrics are not public
# (tests/test_openapi.py checks the route on a worker).
[[operations]]
include-path = "/metrics"
enabled = false

# Logging out ends a session of its own, not the one the other requests use.
[[operations]]
include-path = "/auth/logout"
headers = {{ Cookie = "{logout_cookie}" }}
"""
    )


async def test_schemathesis_finds_nothing(
    stack: Stack, tmp_path: Path, redis: Redis, pg: asyncpg.Connection
) -> None:
    url = stack.url
    packet = {"kind": "red_packet", "name": "福", "total_fen": 5_000, "count": 50}
    status, created, _ = _post(f"{url}/api/admin/campaigns", packet, ADMIN)
    assert status == 201
    rp = str(created["id"])
    lottery = {
        "kind": "lottery",
        "name": "财神到",
        "tiers": [{"name": "金元宝", "stock": 5, "weight": 1, "value_fen": 888}],
        "no_prize_weight": 3,
        "quota_total": 1000,
    }
    status, created, _ = _post(f"{url}/api/admin/campaigns", lottery, ADMIN)
    assert status == 201
    campaigns = [rp, str(created["id"])]
    _, _, player = _post(f"{url}/auth/dev-login", {"openid": "fuzzer"}, {})
    _, _, leaver = _post(f"{url}/auth/dev-login", {"openid": "leaver"}, {})
    assert player.startswith("hb_session=")
    config = tmp_path / "schemathesis.toml"
    assets = _assets(url)
    assert len(assets) >= 2
    _config(config, campaigns, assets, leaver)

    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is not installed in this environment"
    command = [
        st,
        "--config-file",
        str(config),
        "run",
        f"{url}/api/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "2",
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
        "--max-redirects",
        "0",
        "--no-color",
        "-H",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "-H",
        f"Cookie: {player}",
        "-H",
        "X-Requested-With: hongbao",
    ]
    started = time.monotonic()
    run = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    report = run.stdout[-12_000:] + run.stderr[-4_000:]
    assert run.returncode == 0, report
    print(f"schemathesis: {time.monotonic() - started:.0f}s\n{run.stdout[-3_000:]}")

    # Whatever it sent, every worker still serves, and in every red packet (ours and
    # those it created) the envelopes won and left are exactly the ones created.
    stack.wait_ready(timeout=10)
    rows = await pg.fetch("SELECT id, total_fen, count FROM campaigns WHERE kind = 'red_packet'")
    assert rp in {row["id"] for row in rows}
    for row in rows:
        keys = CampaignKeys.of(row["id"])
        won = [Envelope.decode(v).amount_fen for v in (await redis.hgetall(keys.winners)).values()]
        left = [Envelope.decode(v).amount_fen for v in await redis.lrange(keys.pool, 0, -1)]
        assert len(won) + len(left) == row["count"], row["id"]
        assert sum(won) + sum(left) == row["total_fen"], row["id"]
        assert row["count"] <= 1_000
