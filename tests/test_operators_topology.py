"""Operators through the production topology: HAProxy in front of two worker processes.

The audit log records the client address HAProxy saw (a forged X-Forwarded-For is
replaced) and HAProxy's request id; a revoked token is refused by every worker within
TOKEN_CACHE_S; the winners CSV streams through HAProxy (chunked, never one body) and
adds up to what Redis and PostgreSQL hold.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from app.identity.operators import TOKEN_CACHE_S, OperatorDirectory, Role
from app.identity.sessions import SessionStore
from app.local.haproxy import haproxy_binary
from app.store.scripts import CampaignKeys
from tests.conftest import ADMIN, PAGE
from tests.test_topology import Topology, topology

__all__ = ["topology"]  # a fixture, imported for this module's test

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed"),
]


async def operator(database_url: str, name: str, role: Role) -> str:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        return await OperatorDirectory(pool).add(name, role)
    finally:
        await pool.close()


async def revoke(database_url: str, name: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        await OperatorDirectory(pool).revoke(name)
    finally:
        await pool.close()


async def test_audit_remote_revocation_and_csv_through_haproxy(
    topology: Topology, redis_url: str, database_url: str
) -> None:
    url = topology.url
    token = await operator(database_url, "值班-小王", Role.ADMIN)
    named = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), headers=PAGE) as http:
        body = {"kind": "red_packet", "name": "年会", "total_fen": 1_234_567, "count": 2000}
        forged = {**named, "X-Forwarded-For": "6.6.6.6"}
        async with http.post(f"{url}/api/admin/campaigns", json=body, headers=forged) as resp:
            assert resp.status == 201, await resp.text()
            cid = (await resp.json())["id"]
            request_id = resp.headers["X-Request-ID"]
        async with http.get(f"{url}/api/admin/audit", headers=ADMIN) as resp:
            (entry,) = (await resp.json())["entries"]
        assert entry["operator"] == "值班-小王"
        assert entry["campaign_id"] == cid
        assert entry["remote"] == "127.0.0.1"  # HAProxy's view, not the forged header
        assert entry["request_id"] == request_id

        # 2,500 players for 2,000 envelopes, through HAProxy.
        redis = Redis.from_url(redis_url)
        try:
            tokens = await SessionStore(redis, 3600).mint([f"p{i:05d}" for i in range(2500)])
            sem = asyncio.Semaphore(64)

            async def grab(session: str) -> None:
                async with (
                    sem,
                    http.post(
                        f"{url}/api/campaigns/{cid}/grab",
                        headers={"Cookie": f"hb_session={session}"},
                    ) as resp,
                ):
                    assert resp.status == 200, await resp.text()

            await asyncio.gather(*(grab(t) for t in tokens))
            deadline = time.monotonic() + 60
            while await redis.xlen(CampaignKeys.of(cid).ledger):
                assert time.monotonic() < deadline, "the ledger did not drain"
                await asyncio.sleep(0.2)
            won_count, won_fen = await redis.hmget(
                CampaignKeys.of(cid).meta, "won_count", "won_fen"
            )
        finally:
            await redis.aclose()

        async with http.get(f"{url}/api/admin/campaigns/{cid}/winners.csv", headers=named) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            assert "Content-Length" not in resp.headers
            chunks = [chunk async for chunk in resp.content.iter_any()]
        rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode("utf-8"), newline="")))
        conn = await asyncpg.connect(database_url)
        try:
            ledger_fen = await conn.fetchval(
                "SELECT sum(amount_fen) FROM grabs WHERE campaign_id = $1", cid
            )
        finally:
            await conn.close()
        assert len(rows) == int(won_count) == 2000
        assert sum(int(r["amount_fen"]) for r in rows) == ledger_fen == int(won_fen) == 1_234_567
        assert len({r["openid"] for r in rows}) == 2000

        # Revoked: every worker refuses the token within TOKEN_CACHE_S (each has it cached).
        for _ in range(8):
            async with http.get(f"{url}/api/admin/campaigns", headers=named) as resp:
                assert resp.status == 200
        await revoke(database_url, "值班-小王")
        revoked_at = time.monotonic()
        while True:
            statuses = []
            for _ in range(8):  # HAProxy round-robins: both workers answer
                async with http.get(f"{url}/api/admin/campaigns", headers=named) as resp:
                    statuses.append(resp.status)
            if set(statuses) == {401}:
                break
            assert set(statuses) <= {200, 401}
            assert time.monotonic() - revoked_at < TOKEN_CACHE_S + 3, statuses
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.2)  # access lines are written in batches within 50 ms
        for name in ("w1", "w2"):  # both workers had it cached, both refuse it now
            lines = [
                orjson.loads(line)
                for line in (topology.tmp / f"{name}.log").read_text().splitlines()
                if line.startswith("{") and '"route":"/api/admin/campaigns"' in line
            ]
            statuses = {line["status"] for line in lines if line["method"] == "GET"}
            assert statuses == {200, 401}, (name, statuses)
        # The bootstrap admin is untouched.
        async with http.get(f"{url}/api/admin/campaigns", headers=ADMIN) as resp:
            assert resp.status == 200
