"""The bench's OpenResty comparison (bench/openresty/): its shipped nginx config passes
``nginx -t``, and a small round through a real nginx settles every grab exactly once;
``./hb bench`` names the Debian packages it lacks.

nginx-light and libnginx-mod-http-lua are in scripts/system-packages, so ``./hb test``
(and CI) installs them; without them these tests are skipped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.local.embedded import free_port
from app.store.scripts import CAMPAIGNS_SET
from bench import openresty
from bench.measure import Result
from bench.report import Setup
from bench.report import openresty as comparison
from bench.rounds import Measured
from tests.conftest import create_campaign, gather_limited

needs_nginx = pytest.mark.skipif(
    openresty.nginx_binary() is None, reason="no nginx with ngx_lua (nginx-light)"
)
ROOT = Path(__file__).resolve().parent.parent
ENVELOPES = 100
PLAYERS = 300


@needs_nginx
def test_shipped_config_passes_nginx_t(tmp_path: Path, redis_url: str) -> None:
    result = openresty.check(tmp_path, free_port(), redis_url, b"k" * 32)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
    assert "test is successful" in result.stderr


async def grab(
    http: aiohttp.ClientSession, url: str, cookie: str | None, csrf: bool = True
) -> tuple[int, dict[str, object]]:
    """One grab as wrk's players.lua sends it: status and JSON body."""
    headers = {"X-Requested-With": "hongbao"} if csrf else {}
    if cookie is not None:
        headers["Cookie"] = f"hb_session={cookie}"
    async with http.post(url, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


@needs_nginx
async def test_smoke_round_settles_every_grab_once(
    tmp_path: Path, redis_url: str, client: TestClient, redis: Redis
) -> None:
    campaign = await create_campaign(client, total_fen=ENVELOPES * 100, count=ENVELOPES)
    cid = str(campaign["id"])
    await openresty.unlist(redis, cid)
    assert not await redis.sismember(CAMPAIGNS_SET, cid)
    key = secrets.token_urlsafe(32).encode()
    expires = int(time.time()) + 600
    players = [f"smoke-{i:03d}" for i in range(PLAYERS)]
    cookies = {p: openresty.mint(key, p, expires) for p in players}
    cookie = cookies[players[0]]
    forged = cookie[:-1] + ("B" if cookie.endswith("A") else "A")
    with openresty.OpenResty(tmp_path / "nginx", free_port(), redis_url, key) as nginx:
        url = f"{nginx.url}/api/campaigns/{cid}/grab"
        async with aiohttp.ClientSession() as http:
            first = await gather_limited([grab(http, url, cookies[p]) for p in players], 32)
            again = await gather_limited([grab(http, url, cookies[p]) for p in players], 32)
            refused = [
                await grab(http, url, None),
                await grab(http, url, forged),
                await grab(http, url, openresty.mint(key, players[0], int(time.time()) - 1)),
                await grab(http, url, openresty.mint(b"not the key", players[0], expires)),
                await grab(http, url, cookie, csrf=False),
                await grab(http, f"{nginx.url}/api/campaigns/no-such/grab", cookie),
            ]
    assert all(status == 200 for status, _ in first + again)
    told = {p: body for p, (_, body) in zip(players, first, strict=True)}
    won = {p: body["amount_fen"] for p, body in told.items() if body["result"] == "won"}
    assert len(won) == ENVELOPES
    assert sum(won.values()) == ENVELOPES * 100  # type: ignore[arg-type]
    assert all(body == {"result": "sold_out"} for p, body in told.items() if p not in won)
    for p, (_, body) in zip(players, again, strict=True):
        expected = (
            {"result": "already_won", "amount_fen": won[p]} if p in won else {"result": "sold_out"}
        )
        assert body == expected
    assert [(s, b["error"]) for s, b in refused] == [
        (401, "unauthenticated"),
        (401, "unauthenticated"),
        (401, "unauthenticated"),
        (401, "unauthenticated"),
        (403, "csrf"),
        (404, "not_found"),
    ]
    settled = await openresty.settlement(redis, cid)
    assert settled.ok, settled
    assert (settled.winners, settled.taken, settled.won_fen) == (ENVELOPES, ENVELOPES, 10_000)
    winners = await redis.hgetall(f"hb:{{{cid}}}:winners")
    assert {k.decode(): int(v.split(b":")[1]) for k, v in winners.items()} == won


def run(name: str, rps: float, requests: int, cpu: dict[str, float]) -> Result:
    return Result(name, rps, 5.0, 20.0, 0, requests, cpu)


def test_report_shows_both_ratios_and_openresty_p99() -> None:
    measured = Measured()
    floor = run("floor", 20_000, 100_000, {"floor": 5.0})
    ours = run("grab", 10_000, 50_000, {"app": 5.0, "Redis": 1.0, "wrk": 1.5, "HAProxy": 1.5})
    theirs = run("openresty", 20_000, 100_000, {"OpenResty": 4.0, "Redis": 3.0, "wrk": 3.0})
    theirs.p99_ms = 12.5
    measured.openresty = [((floor, ours), theirs)]
    measured.openresty_calls = 100_000
    setup = Setup(2, 64, 5, 1, 100_000, "process", "nginx-light 1.22.1")
    text = "\n".join(comparison(setup, measured))
    # ours: 9 s of CPU over 50,000 grabs = 180 µs; theirs: 10 s over 100,000 = 100 µs.
    assert "| ours (HAProxy + app workers) | 10,000 | 5.00 | 20.00 | 100 | 180 |" in text
    assert "| OpenResty | 20,000 | 5.00 | 12.50 | 40 | 100 |" in text
    assert "grabs/s 0.50 (median of paired rounds)" in text
    assert "CPU per grab 1.80 times OpenResty's (its server alone: 2.50 times)" in text
    assert "on a fresh campaign;\nnginx-light 1.22.1:" in text
    assert "1.000 script calls per grab" in text
    assert text.endswith("nobody twice, in every run: yes")


def test_hb_bench_stops_at_once_naming_missing_bench_packages() -> None:
    # A checkout whose bench list names one package nobody has. /tmp, not tmp_path: the
    # ordinary user below must be able to enter it.
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        checkout = Path(folder)
        (checkout / "scripts").mkdir()
        shutil.copy(ROOT / "hb", checkout / "hb")
        shutil.copy(ROOT / "scripts" / "system-packages", checkout / "scripts")
        listed = (ROOT / "scripts" / "bench-packages").read_text()
        (checkout / "scripts" / "bench-packages").write_text(
            listed + "hongbao-no-such-package  /nonexistent/hongbao-probe  the test's own\n"
        )
        for path in (checkout, checkout / "scripts"):
            path.chmod(0o755)
        argv = ["bash", str(checkout / "hb"), "bench", "--quick"]
        if os.geteuid() == 0:
            # As root, hb installs with apt-get; an ordinary user is told the command.
            argv = ["runuser", "-u", "nobody", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result
        assert result.stderr.splitlines()[-1].endswith(
            "hongbao-no-such-package; install with: sudo apt-get install -y hongbao-no-such-package"
        )
        assert result.stderr.startswith("hb: the bench needs ")
        assert not (checkout / ".venv").exists()
