"""The operators' campaign list and winners CSV, in-process against the real stores."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.store import reads
from app.store.scripts import CampaignKeys
from app.web.keys import PG
from tests.conftest import ADMIN, create_campaign, login
from tests.test_times import TIME

LOTTERY = {
    "kind": "lottery",
    "name": "财神到",
    "tiers": [
        {"name": "金元宝", "stock": 30, "weight": 1, "value_fen": 888},
        {"name": "=1+1 福袋", "stock": 30, "weight": 1, "value_fen": None},
    ],
    "quota_total": 3,
}


async def listing(client: TestClient, **query: str) -> dict[str, object]:
    resp = await client.get("/api/admin/campaigns", params=query, headers=ADMIN)
    body = await resp.json()
    assert resp.status == 200, body
    return body  # type: ignore[no-any-return]


async def wait_drained(redis: Redis, cid: str) -> None:
    deadline = time.monotonic() + 30
    while await redis.xlen(CampaignKeys.of(cid).ledger):
        assert time.monotonic() < deadline, "the ledger did not drain"
        await asyncio.sleep(0.05)


async def test_list_newest_first_with_live_state_in_pages(client: TestClient) -> None:
    sold = await create_campaign(client, name="售罄", total_fen=100, count=1)
    later = await create_campaign(client, name="明天", starts_at="2999-01-01T00:00:00+08:00")
    over = await create_campaign(
        client, starts_at="2000-01-01T00:00:00Z", ends_at="2000-01-02T00:00:00Z"
    )
    lottery = await (await client.post("/api/admin/campaigns", json=LOTTERY, headers=ADMIN)).json()
    await login(client, "alice")
    assert (await (await client.post(f"/api/campaigns/{sold['id']}/grab")).json())[
        "result"
    ] == "won"

    page = await listing(client)
    entries = page["campaigns"]
    assert page["next"] is None
    assert [e["id"] for e in entries] == [lottery["id"], over["id"], later["id"], sold["id"]]  # type: ignore[index]
    assert [e["state"] for e in entries] == ["open", "ended", "scheduled", "sold_out"]  # type: ignore[index]
    red = entries[-1]  # type: ignore[index]
    assert red["name"] == "售罄"
    assert red["kind"] == "red_packet"
    assert (red["total_fen"], red["count"], red["won_count"], red["won_fen"]) == (100, 1, 1, 100)
    assert TIME.fullmatch(red["created_at"])
    lot = entries[0]  # type: ignore[index]
    assert (lot["kind"], lot["tiers"], lot["stock"], lot["prizes_won"]) == ("lottery", 2, 60, 0)

    # Pages of one: the same campaigns in the same order, then next is null.
    seen, cursor = [], None
    while True:
        page = await listing(client, limit="1", **({"cursor": cursor} if cursor else {}))
        seen += [e["id"] for e in page["campaigns"]]  # type: ignore[attr-defined]
        cursor = page["next"]  # type: ignore[assignment]
        if cursor is None:
            break
    assert seen == [e["id"] for e in entries]  # type: ignore[index]

    assert [e["id"] for e in (await listing(client, kind="lottery"))["campaigns"]] == [
        lottery["id"]
    ]  # type: ignore[attr-defined]
    assert [e["id"] for e in (await listing(client, state="sold_out"))["campaigns"]] == [sold["id"]]  # type: ignore[attr-defined]
    filtered = await listing(client, state="ended", kind="red_packet", limit="1")
    assert [e["id"] for e in filtered["campaigns"]] == [over["id"]]  # type: ignore[attr-defined]


async def test_list_bad_parameters_are_422_naming_the_field(client: TestClient) -> None:
    for query in (
        {"state": "running"},
        {"state": ""},
        {"state": "null"},  # a query string has no null
        {"limit": "null"},
        {"kind": "coupon"},
        {"limit": "0"},
        {"limit": "201"},
        {"limit": "1.5"},
        {"cursor": "not-ours"},
        {"cursor": "YTE6MTI"},  # another route's cursor
        {"colour": "red"},
    ):
        resp = await client.get("/api/admin/campaigns", params=query, headers=ADMIN)
        body = await resp.json()
        assert resp.status == 422, (query, body)
        assert (body["error"], body["field"]) == ("invalid", next(iter(query))), body
    resp = await client.get("/api/admin/campaigns?limit=1&limit=2", headers=ADMIN)
    assert (resp.status, (await resp.json())["field"]) == (422, "limit")


def parse_csv(raw: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8"), newline="")))


async def test_red_packet_csv_adds_up(
    client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    campaign = await create_campaign(client, total_fen=99_999, count=40)
    cid = str(campaign["id"])
    for i in range(60):
        await login(client, f"p{i:03d}")
        await client.post(f"/api/campaigns/{cid}/grab")
    await wait_drained(redis, cid)

    resp = await client.get(f"/api/admin/campaigns/{cid}/winners.csv", headers=ADMIN)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert resp.headers["Content-Disposition"] == f'attachment; filename="winners-{cid}.csv"'
    raw = await resp.read()
    assert raw.splitlines()[0] == b"openid,amount_fen,granted_at,payout_state"
    rows = parse_csv(raw)
    won_count, won_fen = await redis.hmget(CampaignKeys.of(cid).meta, "won_count", "won_fen")
    ledger_sum = await pg.fetchval("SELECT sum(amount_fen) FROM grabs WHERE campaign_id = $1", cid)
    assert sum(int(r["amount_fen"]) for r in rows) == ledger_sum == int(won_fen) == 99_999
    assert len(rows) == int(won_count) == 40
    assert len({r["openid"] for r in rows}) == 40
    # Every grant has its payout row (the outbox trigger): its state is shown.
    assert {r["payout_state"] for r in rows} == {"NEW"}
    times = [r["granted_at"] for r in rows]
    assert times == sorted(times)
    assert all(t.endswith("Z") for t in times)


async def test_lottery_csv_one_row_per_prize(
    client: TestClient, redis: Redis, pg: asyncpg.Connection
) -> None:
    lottery = await (await client.post("/api/admin/campaigns", json=LOTTERY, headers=ADMIN)).json()
    cid = lottery["id"]
    for i in range(7):
        await login(client, f"d{i}")
        for _ in range(3):
            assert (await client.post(f"/api/campaigns/{cid}/draw")).status == 200
    await wait_drained(redis, cid)

    resp = await client.get(f"/api/admin/campaigns/{cid}/winners.csv", headers=ADMIN)
    assert resp.status == 200
    raw = await resp.read()
    assert raw.splitlines()[0] == b"openid,draw_no,tier,prize,value_fen,drawn_at,payout_state"
    rows = parse_csv(raw)
    stats = await (await client.get(f"/api/admin/campaigns/{cid}", headers=ADMIN)).json()
    assert len(rows) == stats["prizes_won"] == 21  # no no-prize weight: every draw wins
    ledger = await pg.fetch(
        "SELECT openid, draw_no, tier, value_fen FROM draws"
        " WHERE campaign_id = $1 AND tier IS NOT NULL",
        cid,
    )
    assert sorted(
        (r["openid"], int(r["draw_no"]), int(r["tier"]), int(r["value_fen"])) for r in rows
    ) == sorted((r["openid"], r["draw_no"], r["tier"], r["value_fen"]) for r in ledger)
    names = {"0": "金元宝", "1": "'=1+1 福袋"}  # as named; a formula-looking cell is not one
    assert all(r["prize"] == names[r["tier"]] for r in rows)
    for r in rows:
        assert r["payout_state"] == ("NEW" if r["tier"] == "0" else "")
    assert sum(int(r["value_fen"]) for r in rows) == 888 * sum(r["tier"] == "0" for r in rows)


async def test_csv_of_unknown_or_empty_campaign(client: TestClient) -> None:
    resp = await client.get("/api/admin/campaigns/nope/winners.csv", headers=ADMIN)
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
    resp = await client.get("/api/admin/campaigns/nope/winners.csv")
    assert resp.status == 401
    cid = (await create_campaign(client))["id"]
    resp = await client.get(f"/api/admin/campaigns/{cid}/winners.csv", headers=ADMIN)
    assert await resp.read() == b"openid,amount_fen,granted_at,payout_state\r\n"


async def test_list_shows_paused_and_ended_by_operators(client: TestClient) -> None:
    paused = (await create_campaign(client, name="暂停"))["id"]
    ended = (await create_campaign(client, name="结束"))["id"]
    lottery = (
        await (await client.post("/api/admin/campaigns", json=LOTTERY, headers=ADMIN)).json()
    )["id"]
    for cid, action in ((paused, "pause"), (ended, "end"), (lottery, "pause")):
        resp = await client.post(f"/api/admin/campaigns/{cid}/{action}", headers=ADMIN)
        assert resp.status == 200, await resp.text()
    states = {e["id"]: e["state"] for e in (await listing(client))["campaigns"]}  # type: ignore[attr-defined]
    assert states == {lottery: "paused", ended: "ended", paused: "paused"}
    only = await listing(client, state="paused", kind="red_packet")
    assert [e["id"] for e in only["campaigns"]] == [paused]  # type: ignore[attr-defined]


async def test_csv_download_cut_short_frees_its_connection(
    client: TestClient,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that goes away mid-download: aiohttp cancels the handler, the export's
    generators are closed, so the cursor's PostgreSQL connection goes back to the pool at
    once (not when collected), and the application logs no error."""
    monkeypatch.setattr(reads, "STREAM_BATCH", 1)  # one write per row: the cut comes early
    cid = str((await create_campaign(client, total_fen=50_000, count=5000))["id"])
    # Grants straight into the ledger (this test is about the stream, not the books).
    await pg.execute(
        "INSERT INTO grabs (campaign_id, openid, seq, amount_fen, granted_at, stream_id)"
        " SELECT campaign_id, 'u' || seq, seq, amount_fen, now(), seq::text"
        " FROM envelopes WHERE campaign_id = $1",
        cid,
    )
    pool = client.app[PG]
    resp = await client.get(f"/api/admin/campaigns/{cid}/winners.csv", headers=ADMIN)
    assert resp.status == 200
    assert (await resp.content.readany()).startswith(b"openid,")
    resp.close()  # drops the connection with most rows unsent
    deadline = time.monotonic() + 10
    while pool.get_size() > pool.get_idle_size():
        assert time.monotonic() < deadline, "the export kept its PostgreSQL connection"
        await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
