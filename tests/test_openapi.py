"""The published contract (GET /api/openapi.json): a valid OpenAPI 3.1 document that
describes every registered route, whose request schemas say what the validators say,
and that real answers of the real app on real Redis and PostgreSQL conform to."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import asyncpg
import jsonschema
import msgspec
import orjson
import pytest
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from redis.asyncio import Redis

from app.identity.sessions import Session
from app.lottery.spec import LotteryDefinition
from app.records import Envelope
from app.redpacket.spec import RedPacketDefinition
from app.store.scripts import CampaignKeys
from app.web.keys import ASSETS, SESSIONS
from app.web.openapi import registered
from tests.conftest import ADMIN, login
from tests.test_bad_requests import CREATE_CASES, VALID
from tests.test_lottery_api import BAD_CONFIGS, LOTTERY

OPENIDS = ("alice", "bob", "carol")
RETRY = {"Idempotency-Key": "draw-0001"}
# Every route there is as this test was written; each one's answers are checked below.
KNOWN_ROUTES = {
    ("get", "/"),
    ("get", "/api/openapi.json"),
    ("get", "/c/{id}"),
    ("get", "/admin"),
    ("get", "/static/{name}"),
    ("get", "/favicon.ico"),
    ("get", "/healthz"),
    ("get", "/healthz/ledger"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("post", "/api/admin/campaigns"),
    ("get", "/api/admin/campaigns/{id}"),
    ("get", "/api/admin/campaigns"),
    ("get", "/api/admin/campaigns/{id}/winners.csv"),
    ("get", "/api/admin/audit"),
    ("post", "/api/admin/campaigns/{id}/pause"),
    ("post", "/api/admin/campaigns/{id}/resume"),
    ("post", "/api/admin/campaigns/{id}/end"),
    ("get", "/api/campaigns/{id}"),
    ("get", "/api/campaigns/{id}/results"),
    ("post", "/api/campaigns/{id}/grab"),
    ("get", "/api/campaigns/{id}/me"),
    ("post", "/api/campaigns/{id}/draw"),
    ("post", "/api/campaigns/{id}/claim"),
    ("post", "/api/wechatpay/notify"),
    ("post", "/auth/dev-login"),
    ("post", "/auth/logout"),
    ("get", "/auth/wechat/login"),
    ("get", "/auth/wechat/callback"),
}
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class Contract:
    """The served document, checking answers against it and noting which it saw."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.seen: set[tuple[str, str, int]] = set()

    def schema(self, subschema: dict[str, Any]) -> jsonschema.Draft202012Validator:
        """A validator for ``subschema``, its $refs resolved in the document."""
        root = {"$schema": SCHEMA_DIALECT, **subschema, "components": self.document["components"]}
        return jsonschema.Draft202012Validator(
            root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )

    def request_schema(self, method: str, path: str) -> jsonschema.Draft202012Validator:
        """The validator of an operation's request body."""
        body = self.document["paths"][path][method]["requestBody"]
        return self.schema(body["content"]["application/json"]["schema"])

    def check(self, method: str, path: str, status: int, content_type: str, body: bytes) -> None:
        """Fail unless the document lists this answer: status, media type and body."""
        operation = self.document["paths"][path][method]
        response = operation["responses"].get(str(status))
        assert response is not None, f"{method} {path}: {status} is not documented"
        content = response.get("content")
        if content is None:
            assert body == b"", f"{method} {path} {status}: undocumented body {body[:80]!r}"
        else:
            assert content_type in content, f"{method} {path} {status}: {content_type}"
            if content_type == "application/json":
                self.schema(content[content_type]["schema"]).validate(orjson.loads(body))
        self.seen.add((method, path, status))


@pytest.fixture
async def contract(client: TestClient) -> Contract:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    assert resp.headers["Cache-Control"].startswith("public")
    return Contract(await resp.json())


async def _login(client: TestClient, openid: str) -> str:
    """A session cookie for ``openid``, kept out of the client's jar (requests name theirs)."""
    token = await login(client, openid)
    client.session.cookie_jar.clear()
    return token


async def call(
    client: TestClient,
    contract: Contract,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """Make the request, check its answer against the document, return status and body."""
    url = path.format(**(params or {}))
    resp = await client.request(method.upper(), url, allow_redirects=False, **kwargs)
    body = await resp.read()
    contract.check(method, path, resp.status, resp.content_type, body)
    is_json = resp.content_type == "application/json"
    return resp.status, orjson.loads(body) if is_json else body


def test_the_document_is_valid_openapi_3_1(contract: Contract) -> None:
    assert contract.document["openapi"] == "3.1.0"
    validate(contract.document)


def test_every_registered_route_is_described(client: TestClient, contract: Contract) -> None:
    described = {
        (method, path) for path, ops in contract.document["paths"].items() for method in ops
    }
    served = set(registered(client.app))
    assert served - described == set(), "routes the document does not describe"
    assert described - served == set(), "described routes that no route serves"


def _cases(cases: list[tuple[str, Any, int, str, str | None]]) -> Iterator[tuple[str, Any]]:
    for name, body, _, _, _ in cases:
        if not isinstance(body, bytes):
            yield name, body


def _decodes(body: Any) -> bool:
    """Whether the structs that validate requests take ``body`` (before the code's checks)."""
    try:
        msgspec.convert(body, RedPacketDefinition | LotteryDefinition)
    except msgspec.ValidationError:
        return False
    return True


def _integral_float(value: Any) -> bool:
    """A float like 10.0 anywhere: JSON Schema counts it an integer, the decoder does not."""
    if isinstance(value, dict):
        return any(_integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_integral_float(v) for v in value)
    return isinstance(value, float) and value.is_integer()


def test_the_request_schema_and_the_decoder_agree(contract: Contract) -> None:
    """On every definition the tests know, good and bad, the published schema and the
    decoder say the same, so the document states each rule a schema can state."""
    schema = contract.request_schema("post", "/api/admin/campaigns")
    bodies = dict(_cases(CREATE_CASES))
    for name, mutate, _ in BAD_CONFIGS:
        body = copy.deepcopy(LOTTERY)
        mutate(body)
        bodies[name] = body
    bodies |= {
        "red packet": VALID,
        "lottery": LOTTERY,
        "NUL in a name": {**VALID, "name": "红\x00包"},
        "no offset": {**VALID, "starts_at": "2030-01-01T00:00:00"},
        "all optional fields": {**VALID, "min_fen": None, "max_fen": 200, "ends_at": None},
    }
    rejected = 0
    for name, body in bodies.items():
        if _integral_float(body):
            assert not _decodes(body), name
        else:
            assert schema.is_valid(body) == _decodes(body), name
            rejected += not _decodes(body)
    # Not a vacuous agreement: most of the known bad definitions fail on the schema alone.
    assert rejected >= 40


async def test_times_and_names_the_schema_cannot_bound_are_422(client: TestClient) -> None:
    """A name with a control character, and times that leave years 1-9999 in UTC."""
    for body, field in [
        ({**VALID, "name": "红\x00包"}, "name"),
        ({**VALID, "ends_at": "9999-12-31T23:00:00-05:00"}, "ends_at"),
        ({**VALID, "starts_at": "0001-01-01T00:00:00+08:00"}, "starts_at"),
        ({**LOTTERY, "fallback": "谢谢\n参与"}, "fallback"),
    ]:
        resp = await client.post("/api/admin/campaigns", json=body, headers=ADMIN)
        assert resp.status == 422, await resp.text()
        assert (await resp.json())["field"] == field


def test_the_check_can_fail(contract: Contract) -> None:
    """A body, status or media type the document does not list is caught."""
    grab = "/api/campaigns/{id}/grab"
    with pytest.raises(jsonschema.ValidationError):
        contract.check("post", grab, 200, "application/json", b'{"result":"won","amount_fen":"1"}')
    with pytest.raises(jsonschema.ValidationError):
        contract.check("post", grab, 409, "application/json", b'{"error":"x","message":"m"}')
    with pytest.raises(AssertionError, match="not documented"):
        contract.check("post", grab, 418, "application/json", b"{}")
    with pytest.raises(AssertionError):
        contract.check("post", grab, 200, "text/html", b"<p>")


async def test_real_answers_conform(
    client: TestClient, contract: Contract, redis: Redis, pg: asyncpg.Connection
) -> None:
    """Every route, in its answers that matter, through the real app and stores."""
    c = contract
    await call(client, c, "get", "/api/openapi.json")
    for path in ("/healthz", "/healthz/ledger", "/readyz", "/metrics"):
        status, _ = await call(client, c, "get", path)
        assert status == 200, path

    # Operators: create, errors, statistics.
    create = "/api/admin/campaigns"
    assert (await call(client, c, "post", create, json=VALID))[0] == 401
    assert (await call(client, c, "post", create, data=b"[1]", headers=ADMIN))[0] == 400
    bad = {**VALID, "count": 1.5}
    assert (await call(client, c, "post", create, json=bad, headers=ADMIN))[0] == 422
    big = {**VALID, "name": "x" * 70_000}
    assert (await call(client, c, "post", create, json=big, headers=ADMIN))[0] == 413
    packet = {**VALID, "total_fen": 300, "count": 2}
    status, created = await call(client, c, "post", create, json=packet, headers=ADMIN)
    assert status == 201
    rp = created["id"]
    later = {**VALID, "starts_at": "2998-01-01T00:00:00Z"}
    scheduled = (await call(client, c, "post", create, json=later, headers=ADMIN))[1]["id"]
    status, created = await call(client, c, "post", create, json=LOTTERY, headers=ADMIN)
    assert status == 201
    lottery = created["id"]
    past = {**LOTTERY, "starts_at": "2001-01-01T00:00:00Z", "ends_at": "2001-02-01T00:00:00Z"}
    past["tiers"] = [{"name": "红包", "stock": 1, "weight": 1}]
    ended = (await call(client, c, "post", create, json=past, headers=ADMIN))[1]["id"]
    stats = "/api/admin/campaigns/{id}"
    for cid in (rp, lottery, ended):
        assert (await call(client, c, "get", stats, params={"id": cid}, headers=ADMIN))[0] == 200
    assert (await call(client, c, "get", stats, params={"id": rp}))[0] == 401
    assert (await call(client, c, "get", stats, params={"id": "nosuch"}, headers=ADMIN))[0] == 404
    # Operators' reads (any role): the list, the audit log, the winners CSV.
    status, page = await call(client, c, "get", create, headers=ADMIN)
    assert (status, len(page["campaigns"])) == (200, 4)
    for query in ("?limit=0", "?cursor=x"):
        resp = await client.get(create + query, headers=ADMIN)
        c.check("get", create, resp.status, resp.content_type, await resp.read())
        assert resp.status == 422
    status, page = await call(client, c, "get", "/api/admin/audit", headers=ADMIN)
    assert (status, len(page["entries"])) == (200, 7)  # every POST but the 401
    assert (await call(client, c, "get", "/api/admin/audit"))[0] == 401
    resp = await client.get("/api/admin/audit?limit=x", headers=ADMIN)
    c.check("get", "/api/admin/audit", resp.status, resp.content_type, await resp.read())
    csv = "/api/admin/campaigns/{id}/winners.csv"
    for cid, code in ((lottery, 200), ("nosuch", 404)):
        assert (await call(client, c, "get", csv, params={"id": cid}, headers=ADMIN))[0] == code
    assert (await call(client, c, "get", csv, params={"id": rp}))[0] == 401

    # Players: views, grabs, draws, their results, and the errors on the way.
    view, grab, draw, me = (
        "/api/campaigns/{id}",
        "/api/campaigns/{id}/grab",
        "/api/campaigns/{id}/draw",
        "/api/campaigns/{id}/me",
    )
    for cid in (rp, scheduled, lottery, ended, "nosuch"):
        await call(client, c, "get", view, params={"id": cid})
    assert (await call(client, c, "post", grab, params={"id": rp}))[0] == 401
    login = "/auth/dev-login"
    assert (await call(client, c, "post", login, json={"openid": "a b"}))[0] == 422
    assert (await call(client, c, "post", login, data=b"{"))[0] == 400
    status, body = await call(client, c, "post", login, json={"openid": " alice "})
    assert (status, body) == (200, {"openid": "alice"})
    cookies = {openid: {"hb_session": await _login(client, openid)} for openid in OPENIDS}
    results = []
    for openid in ("alice", "alice", "bob", "carol"):
        status, body = await call(
            client, c, "post", grab, params={"id": rp}, cookies=cookies[openid]
        )
        results.append((status, body["result"]))
    assert [r for _, r in results] == ["won", "already_won", "won", "sold_out"]
    alice, carol = cookies["alice"], cookies["carol"]
    status, mine = await call(client, c, "get", me, params={"id": rp}, cookies=alice)
    assert mine["result"] == "won"
    assert (await call(client, c, "get", me, params={"id": rp}, cookies=carol))[1][
        "result"
    ] == "none"
    assert (await call(client, c, "get", view, params={"id": rp}))[1]["state"] == "sold_out"
    for cid in (scheduled, lottery):
        assert (await call(client, c, "post", grab, params={"id": cid}, cookies=alice))[0] == 409
    assert (await call(client, c, "post", draw, params={"id": rp}, cookies=alice))[0] == 409
    first = await call(
        client, c, "post", draw, params={"id": lottery}, cookies=alice, headers=RETRY
    )
    assert first[0] == 200
    again = await call(
        client, c, "post", draw, params={"id": lottery}, cookies=alice, headers=RETRY
    )
    assert again == first
    bad_key = {"Idempotency-Key": "not a key"}
    status, body = await call(
        client, c, "post", draw, params={"id": lottery}, cookies=alice, headers=bad_key
    )
    assert (status, body["field"]) == (422, "Idempotency-Key")
    status, body = await call(client, c, "post", draw, params={"id": lottery}, cookies=alice)
    assert (status, body["error"]) == (429, "quota_exhausted")
    assert (await call(client, c, "get", me, params={"id": lottery}, cookies=alice))[0] == 200
    assert (await call(client, c, "post", draw, params={"id": "nosuch"}, cookies=alice))[0] == 404
    snapshot = await client.app[SESSIONS].create(Session("peeker", snapshot=True))
    peeker = {"hb_session": snapshot}
    assert (await call(client, c, "post", draw, params={"id": lottery}, cookies=peeker))[0] == 403
    foreign = {"Origin": "https://elsewhere.example", "X-Requested-With": ""}
    status, body = await call(
        client, c, "post", grab, params={"id": rp}, cookies=alice, headers=foreign
    )
    assert (status, body["error"]) == (403, "csrf")
    assert (await call(client, c, "get", me, params={"id": rp}, cookies={"hb_session": "x"}))[
        0
    ] == 401
    # The lifecycle: pause, a draw refused meanwhile, resume, end; then the results.
    pause, resume, end = (
        f"/api/admin/campaigns/{{id}}/{verb}" for verb in ("pause", "resume", "end")
    )
    results = "/api/campaigns/{id}/results"
    status, body = await call(client, c, "post", pause, params={"id": lottery}, headers=ADMIN)
    assert (status, body["state"]) == (200, "paused")
    status, body = await call(client, c, "post", draw, params={"id": lottery}, cookies=alice)
    assert (status, body["error"]) == (409, "paused")
    status, body = await call(client, c, "post", resume, params={"id": lottery}, headers=ADMIN)
    assert (status, body["state"]) == (200, "open")
    assert (await call(client, c, "post", pause, params={"id": lottery}))[0] == 401
    assert (await call(client, c, "post", end, params={"id": "nosuch"}, headers=ADMIN))[0] == 404
    status, body = await call(client, c, "post", end, params={"id": lottery}, headers=ADMIN)
    assert (status, body["state"]) == (200, "ended")
    status, body = await call(client, c, "post", pause, params={"id": lottery}, headers=ADMIN)
    assert (status, body["error"]) == (409, "ended")
    assert (await call(client, c, "get", results, params={"id": lottery}))[0] == 200
    status, body = await call(client, c, "get", results, params={"id": scheduled})
    assert (status, body["error"]) == (409, "not_finished")
    assert (await call(client, c, "get", results, params={"id": "nosuch"}))[0] == 404
    # Payouts are not configured here: claims are 503, notifications refused.
    claim = "/api/campaigns/{id}/claim"
    status, body = await call(client, c, "post", claim, params={"id": rp}, cookies=alice)
    assert (status, body["error"]) == (503, "payouts_off")
    assert (await call(client, c, "post", claim, params={"id": "nosuch"}, cookies=alice))[0] == 404
    status, body = await call(client, c, "post", "/api/wechatpay/notify", json={"id": "x"})
    assert (status, body["code"]) == (404, "FAIL")
    assert (await call(client, c, "post", "/auth/logout", cookies=carol))[0] == 200

    # WeChat login (not configured here), the page and its assets.
    assert (await call(client, c, "get", "/auth/wechat/login", params={}))[0] == 503
    callback = "/auth/wechat/callback?state=nothing"
    resp = await client.get(callback, allow_redirects=False)
    c.check("get", "/auth/wechat/callback", resp.status, resp.content_type, await resp.read())
    assert resp.status == 302
    resp = await client.get(callback + "&code=abc", allow_redirects=False)
    c.check("get", "/auth/wechat/callback", resp.status, resp.content_type, await resp.read())
    status, _ = await call(client, c, "get", "/")
    assert status == 200
    etag = client.app[ASSETS].page.etag
    assert (await call(client, c, "get", "/", headers={"If-None-Match": etag}))[0] == 304
    assert (await call(client, c, "get", "/c/{id}", params={"id": rp}))[0] == 200
    assert (await call(client, c, "get", "/admin"))[0] == 200
    for name in client.app[ASSETS].files:
        assert (await call(client, c, "get", "/static/{name}", params={"name": name}))[0] == 200
    assert (await call(client, c, "get", "/static/{name}", params={"name": "nope.css"}))[0] == 404

    assert (await call(client, c, "get", "/favicon.ico"))[0] == 200

    # Every route the test knows was met (the fuzz test meets any other, through HAProxy),
    # and the money adds up where players grabbed.
    met = {(method, path) for method, path, _ in c.seen}
    assert met == KNOWN_ROUTES
    winners = await redis.hgetall(CampaignKeys.of(rp).winners)
    amounts = [Envelope.decode(value).amount_fen for value in winners.values()]
    assert sorted(winners) == [b"alice", b"bob"]
    assert sum(amounts) == 300
    assert await pg.fetchval("SELECT total_fen FROM campaigns WHERE id = $1", rp) == 300
