"""Named operators and the audit log, in-process against the real stores: tokens hashed in
PostgreSQL, roles enforced on every admin route, a revocation bounded in time, every
state-changing call audited, ADMIN_TOKEN working while PostgreSQL is down."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from app.errors import OperationError
from app.identity import operators as ops
from app.identity.operators import OperatorDirectory, Role
from app.local.embedded import EmbeddedPostgres, free_port
from app.settings import Settings
from app.web.factory import create_app
from app.web.keys import OPERATORS
from tests.conftest import ADMIN, PAGE, create_campaign

LOTTERY = {
    "kind": "lottery",
    "name": "财神到",
    "tiers": [{"name": "福袋", "stock": 10, "weight": 1, "value_fen": None}],
    "quota_total": 1,
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def add(client: TestClient, name: str, role: Role) -> str:
    """A named operator's token, added as the CLI does."""
    return await client.app[OPERATORS].add(name, role)


async def audit(client: TestClient, **query: str) -> dict[str, object]:
    resp = await client.get("/api/admin/audit", params=query, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def test_tokens_are_kept_hashed(client: TestClient, pg: asyncpg.Connection) -> None:
    token = await add(client, "值班-小王", Role.VIEWER)
    assert token.startswith("hbo_")
    assert len(token) == 4 + 43
    row = await pg.fetchrow("SELECT * FROM operators WHERE name = '值班-小王'")
    assert row["token_sha256"] == hashlib.sha256(token.encode()).digest()
    assert token.encode() not in b"".join(str(v).encode() for v in row.values())


async def test_roles(client: TestClient) -> None:
    viewer = await add(client, "viewer-1", Role.VIEWER)
    admin = await add(client, "管理员", Role.ADMIN)
    campaign = await create_campaign(client)
    cid = campaign["id"]
    for path in ("/api/admin/campaigns", f"/api/admin/campaigns/{cid}", "/api/admin/audit"):
        assert (await client.get(path, headers=bearer(viewer))).status == 200, path
    resp = await client.post("/api/admin/campaigns", json=LOTTERY, headers=bearer(viewer))
    assert resp.status == 403
    assert (await resp.json())["error"] == "forbidden"
    resp = await client.post("/api/admin/campaigns", json=LOTTERY, headers=bearer(admin))
    assert resp.status == 201
    # Wrong, unknown, malformed: 401 without a PostgreSQL lookup telling them apart.
    for header in ("Bearer hbo_" + "A" * 43, "Bearer nope", "Basic x", "Bearer ", ""):
        resp = await client.get("/api/admin/campaigns", headers={"Authorization": header})
        assert resp.status == 401, header
        assert (await resp.json())["error"] == "unauthenticated"


async def test_every_state_changing_call_is_audited(client: TestClient) -> None:
    viewer = await add(client, "看板", Role.VIEWER)
    admin = await add(client, "ops", Role.ADMIN)
    created = await client.post("/api/admin/campaigns", json=LOTTERY, headers=bearer(admin))
    cid = (await created.json())["id"]
    bad = await client.post(
        "/api/admin/campaigns",
        json={**LOTTERY, "tiers": []},
        headers={**ADMIN, "X-Request-ID": "req-422"},
    )
    assert bad.status == 422
    assert (
        await client.post("/api/admin/campaigns", json=LOTTERY, headers=bearer(viewer))
    ).status == 403
    await client.get(f"/api/admin/campaigns/{cid}", headers=bearer(admin))  # a read: not audited
    await client.post("/api/admin/campaigns", json=LOTTERY)  # no operator: 401, not audited

    entries = (await audit(client))["entries"]
    assert [(e["operator"], e["role"], e["status"]) for e in entries] == [  # type: ignore[index]
        ("看板", "viewer", 403),
        ("admin", "admin", 422),
        ("ops", "admin", 201),
    ]
    first = entries[-1]  # type: ignore[index]
    assert first["method"] == "POST"
    assert first["path"] == "/api/admin/campaigns"
    assert first["campaign_id"] == cid  # the campaign the call created
    assert first["remote"] == "127.0.0.1"
    assert first["at"].endswith("Z")
    assert entries[1]["request_id"] == "req-422"  # type: ignore[index]
    assert entries[1]["campaign_id"] is None  # type: ignore[index]


async def test_audit_pages(client: TestClient) -> None:
    for _ in range(5):
        await client.post("/api/admin/campaigns", json={"kind": "x"}, headers=ADMIN)
    seen, cursor, pages = [], None, 0
    while True:
        page = await audit(client, limit="2", **({"cursor": cursor} if cursor else {}))
        seen += page["entries"]  # type: ignore[operator]
        pages += 1
        cursor = page["next"]  # type: ignore[assignment]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == 5
    assert [e["status"] for e in seen] == [422] * 5
    ats = [e["at"] for e in seen]
    assert ats == sorted(ats, reverse=True)
    for query in (
        {"limit": "0"},
        {"limit": "201"},
        {"limit": "x"},
        {"cursor": "!!"},
        {"cursor": "YWJj"},
        {"page": "2"},
    ):
        resp = await client.get("/api/admin/audit", params=query, headers=ADMIN)
        body = await resp.json()
        assert resp.status == 422, query
        assert (body["error"], body["field"]) == ("invalid", next(iter(query))), body


async def test_revoked_token_stops_within_the_cache_ttl(client: TestClient) -> None:
    directory = client.app[OPERATORS]
    token = await add(client, "temp", Role.ADMIN)
    assert (await client.get("/api/admin/campaigns", headers=bearer(token))).status == 200
    await directory.revoke("temp")
    # A worker's memory of the verified token is the bound: forget it, as TOKEN_CACHE_S does.
    clock_now = directory._clock()
    directory._clock = lambda: clock_now + ops.TOKEN_CACHE_S + 0.1  # type: ignore[method-assign]
    resp = await client.get("/api/admin/campaigns", headers=bearer(token))
    assert resp.status == 401
    # The name may be given out again, with a new token; the old one stays dead.
    fresh = await add(client, "temp", Role.VIEWER)
    assert (await client.get("/api/admin/campaigns", headers=bearer(fresh))).status == 200
    assert (await client.get("/api/admin/campaigns", headers=bearer(token))).status == 401


async def test_directory_never_takes_an_empty_or_bootstrap_name(
    database_url: str, pg: asyncpg.Connection, client: TestClient
) -> None:
    directory = client.app[OPERATORS]
    for name in ("admin", "", "a\x00b", " ", "x" * 51):
        with pytest.raises(OperationError, match=r"operator|bootstrap"):
            await directory.add(name, Role.ADMIN)
    await directory.add("dup", Role.ADMIN)
    with pytest.raises(OperationError, match="exists"):
        await directory.add("dup", Role.VIEWER)
    # Without a bootstrap token (the CLI) an empty bearer is nobody.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        assert await OperatorDirectory(pool).verify(b"") is None
    finally:
        await pool.close()


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": "redis://127.0.0.1:1/0"}
    return subprocess.run(
        [sys.executable, "-m", "app", "operator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_add_list_revoke(client: TestClient, database_url: str) -> None:
    added = run_cli(database_url, "add", "值班-小王", "--role", "viewer")
    assert added.returncode == 0, added.stderr
    token = added.stdout.splitlines()[-1]
    assert token.startswith("hbo_")
    assert run_cli(database_url, "add", "ops", "--role", "admin").returncode == 0
    assert (await client.get("/api/admin/campaigns", headers=bearer(token))).status == 200

    again = run_cli(database_url, "add", "值班-小王", "--role", "admin")
    assert again.returncode == 2
    assert "exists" in again.stderr
    wrong = run_cli(database_url, "add", "x", "--role", "root")
    assert wrong.returncode == 2
    assert "--role" in wrong.stderr
    assert run_cli(database_url, "revoke", "nobody").returncode == 2
    assert run_cli(database_url, "revoke", "ops").returncode == 0

    listed = run_cli(database_url, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["name", "role", "created", "revoked"]
    assert token not in listed.stdout
    # Columns line up in terminal columns: 值班-小王 takes 9 (four CJK characters and -).
    from app.reports import width

    role_at = {line.split()[0]: width(line[: line.index(line.split()[1])]) for line in lines[1:]}
    assert role_at["值班-小王"] == role_at["ops"] == width(lines[0][: lines[0].index("role")])
    # By name: ops (revoked: a time) before 值班-小王 (live: "-").
    assert lines[1].startswith("ops")
    assert lines[1].endswith("UTC")
    assert lines[2].startswith("值班-小王")
    assert lines[2].rstrip().endswith("-")


def audit_failures(metrics: str) -> float:
    found = re.search(r"^hongbao_audit_failures_total (\S+)$", metrics, re.MULTILINE)
    assert found, "hongbao_audit_failures_total not exported"
    return float(found.group(1))


@pytest.mark.slow
async def test_postgresql_down_bootstrap_works_pause_is_not_blocked(
    aiohttp_server: Any, aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    """With PostgreSQL stopped: ADMIN_TOKEN still reads and pauses (the audit row that
    cannot be written is logged and counted, the pause goes ahead); a named token
    verified within TOKEN_CACHE_S still reads; one never seen is a JSON 503."""
    server = EmbeddedPostgres(tmp_path / "pg", free_port()).start()
    try:
        app = create_app(settings.with_(database_url=server.url), access_log=None)
        client = await aiohttp_client(await aiohttp_server(app), headers=PAGE)
        cid = str((await create_campaign(client))["id"])
        seen = await add(client, "seen", Role.VIEWER)
        unseen = await add(client, "unseen", Role.ADMIN)
        assert (await client.get("/api/admin/campaigns", headers=bearer(seen))).status == 200
        before = audit_failures(await (await client.get("/metrics")).text())

        server.stop()
        resp = await client.post(f"/api/admin/campaigns/{cid}/pause", headers=ADMIN)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["state"] == "paused"
        stats = await client.get(f"/api/admin/campaigns/{cid}", headers=bearer(seen))
        assert stats.status == 200
        resp = await client.get(f"/api/admin/campaigns/{cid}", headers=bearer(unseen))
        assert resp.status == 503
        assert (await resp.json())["error"] == "unavailable"
        after = audit_failures(await (await client.get("/metrics")).text())
        assert after == before + 1

        server.start()
        resp = await client.post(f"/api/admin/campaigns/{cid}/resume", headers=bearer(unseen))
        assert resp.status == 200
        entries = (await audit(client))["entries"]
        # The pause is in the log line and the metric, not in the table; the resume is.
        assert [(e["operator"], e["path"]) for e in entries] == [  # type: ignore[index]
            ("unseen", f"/api/admin/campaigns/{cid}/resume"),
            ("admin", "/api/admin/campaigns"),
        ]
    finally:
        server.stop()
