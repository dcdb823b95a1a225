"""The hot routes answered below the Application (app.web.hot) answer exactly what the
Application answers: every request below is sent to one app through both doors, the
worker's server (app.web.lifecycle.JsonErrorRunner, hot routes first) and the
Application alone, and both answers (status, every header but Date, body), access lines
and metrics are compared; the hot door is checked to have skipped the router for the
hot routes and to have handed everything else to it."""

from __future__ import annotations

import io
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from aiohttp.web_urldispatcher import UrlDispatcher
from yarl import URL

from app.settings import LedgerSettings, Settings
from app.web.accesslog import AccessLog
from app.web.factory import create_app
from app.web.hot import HotRoutes
from app.web.keys import ACCESS_LOG, METRICS, SESSIONS
from app.web.lifecycle import JsonErrorRunner
from tests.conftest import ADMIN, PAGE

GRAB = "/api/campaigns/{id}/grab"
DRAW = "/api/campaigns/{id}/draw"


class WorkerServer(TestServer):
    """The app served as ``python -m app worker`` serves it."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return JsonErrorRunner(self.app, **kwargs)


class ApplicationServer(BaseTestServer):
    """An app another server started, served through ``Application._handle`` only."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        super().__init__()

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        handler: Any = self.app._handle
        server = web.Server(
            handler, request_factory=self.app._make_request, handler_cancellation=True
        )
        return web.ServerRunner(server)


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: dict[str, Any]
    routed: bool  # whether aiohttp's router saw the request


@dataclass
class Doors:
    app: web.Application
    hot: TestClient  # type: ignore[type-arg]
    plain: TestClient  # type: ignore[type-arg]
    out: io.BytesIO
    routed: list[str]

    async def ask(
        self,
        client: TestClient,  # type: ignore[type-arg]
        method: str,
        path: str | URL,
        **kwargs: Any,
    ) -> Answer:
        self.routed.clear()
        resp = await client.request(method, path, **kwargs)
        raw = await resp.read()
        headers = [(k, v) for k, v in resp.headers.items() if k != "Date"]
        return Answer(resp.status, headers, orjson.loads(raw), bool(self.routed))

    async def both(
        self,
        method: str,
        path: str | URL,
        token: str | None = None,
        *,
        plain_first: bool = False,
        **kwargs: Any,
    ) -> tuple[Answer, Answer]:
        """The same request through each door (the hot one first unless ``plain_first``),
        with the same X-Request-ID: both answers in that order, after checking the
        request was counted once by each under the same labels."""
        headers = {**PAGE, "X-Request-ID": uuid.uuid4().hex, **kwargs.pop("headers", {})}
        if token is not None:
            headers["Cookie"] = f"hb_session={token}"
        before = Counter(self.app[METRICS].requests)
        doors = (self.plain, self.hot) if plain_first else (self.hot, self.plain)
        answers = [await self.ask(door, method, path, headers=headers, **kwargs) for door in doors]
        counted = Counter(self.app[METRICS].requests)
        counted.subtract(before)
        assert [n for n in counted.values() if n] == [2], counted
        assert answers[1 if not plain_first else 0].routed
        return answers[0], answers[1]

    async def same(
        self, method: str, path: str | URL, token: str | None = None, *, hot_route: bool, **kw: Any
    ) -> Answer:
        """Both doors answer alike; the hot door skipped the router iff ``hot_route``."""
        hot, plain = await self.both(method, path, token, **kw)
        assert hot.routed is not hot_route, (method, path)
        assert (hot.status, hot.headers, hot.body) == (plain.status, plain.headers, plain.body)
        return hot

    def lines(self) -> Iterator[dict[str, Any]]:
        """Access lines written since the last call."""
        self.app[ACCESS_LOG].flush()
        raw = self.out.getvalue()
        self.out.seek(0)
        self.out.truncate()
        return (orjson.loads(line) for line in raw.splitlines())


@pytest.fixture
async def doors(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Doors]:
    out = io.BytesIO()
    app = create_app(
        settings.with_(access_log_sample=1, ledger=LedgerSettings(drain_in_worker=False)),
        AccessLog(out),
    )
    hot = TestClient(WorkerServer(app), cookie_jar=DummyCookieJar())
    await hot.start_server()
    plain: TestClient = TestClient(ApplicationServer(app), cookie_jar=DummyCookieJar())  # type: ignore[type-arg]
    await plain.start_server()
    routed: list[str] = []
    resolve = UrlDispatcher.resolve

    async def counting(self: UrlDispatcher, request: web.Request) -> Any:
        routed.append(request.path)
        return await resolve(self, request)

    monkeypatch.setattr(UrlDispatcher, "resolve", counting)
    yield Doors(app, hot, plain, out, routed)
    await plain.close()
    await hot.close()


async def _create(doors: Doors, **fields: Any) -> str:
    body = {"kind": "red_packet", "name": "红包", "total_fen": 10_000, "count": 10, **fields}
    resp = await doors.hot.post("/api/admin/campaigns", json=body, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def _players(doors: Doors, n: int, prefix: str = "p") -> list[str]:
    return await doors.app[SESSIONS].mint([f"{prefix}-{i}" for i in range(n)])


def _pairs(doors: Doors) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """The access lines since the last call, two by two (each door's line of a request)."""
    lines = list(doors.lines())
    assert len(lines) % 2 == 0
    for first, second in zip(lines[::2], lines[1::2], strict=True):
        assert first["request_id"] == second["request_id"]
        yield first, second


def _without(line: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k not in names}


async def test_grab_answers_and_lines_are_the_applications(doors: Doors) -> None:
    cid = await _create(doors, total_fen=300, count=3)
    a, b, c, d = await _players(doors, 4)
    path = f"/api/campaigns/{cid}/grab"
    doors.lines()
    # a wins through the hot door and is told already_won through the other; b the other
    # way round: each door's won and already_won answers have the same shape.
    a_hot, a_plain = await doors.both("POST", path, a)
    b_plain, b_hot = await doors.both("POST", path, b, plain_first=True)
    assert not a_hot.routed
    assert not b_hot.routed
    assert a_hot.body["result"] == b_plain.body["result"] == "won"
    assert a_plain.body == {**a_hot.body, "result": "already_won"}
    assert b_hot.body == {**b_plain.body, "result": "already_won"}
    for one, other in ((a_hot, b_plain), (a_plain, b_hot)):
        assert one.status == other.status == 200
        assert [k for k, _ in one.headers] == [k for k, _ in other.headers]
        assert dict(one.headers)["Content-Type"] == dict(other.headers)["Content-Type"]
    lines = list(doors.lines())
    assert len(lines) == 4
    for won, again in (lines[0:2], lines[2:4]):
        assert won["request_id"] == again["request_id"]
        assert _without(won, "ts", "duration_ms") == _without(again, "ts", "duration_ms", "sample")
        assert won["route"] == GRAB
        assert "sample" not in won
        assert again["sample"] == 1
    # c takes the last envelope; then d is told sold out by both doors.
    await doors.both("POST", path, c)
    doors.lines()
    for _ in range(2):
        answer = await doors.same("POST", path, d, hot_route=True)
        assert answer.body == {"result": "sold_out"}
    for first, second in _pairs(doors):
        assert _without(first, "ts", "duration_ms") == _without(second, "ts", "duration_ms")
        assert first["sample"] == 1
        assert first["user"] is not None


async def test_errors_of_the_hot_routes_are_the_applications(doors: Doors) -> None:
    ended = await _create(doors, starts_at="2001-01-01T00:00:00Z", ends_at="2001-01-02T00:00:00Z")
    early = await _create(doors, starts_at="2999-01-01T00:00:00Z")
    paused = await _create(doors)
    resp = await doors.hot.post(f"/api/admin/campaigns/{paused}/pause", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    open_ = await _create(doors)
    (token,) = await _players(doors, 1)
    doors.lines()
    for cid, code in ((ended, "ended"), (early, "not_started"), (paused, "paused")):
        for who in (token, None):
            answer = await doors.same("POST", f"/api/campaigns/{cid}/grab", who, hot_route=True)
            assert (answer.status, answer.body["error"]) == (409, code)
            answer = await doors.same("POST", f"/api/campaigns/{cid}/draw", who, hot_route=True)
            assert answer.status == 409
    # The id spelt with a percent-encoded first letter: the router decodes it too.
    spelt = URL(f"/api/campaigns/%{ord(ended[0]):02X}{ended[1:]}/grab", encoded=True)
    answer = await doors.same("POST", spelt, token, hot_route=True)
    assert (answer.status, answer.body["error"]) == (409, "ended")
    grab, draw = f"/api/campaigns/{open_}/grab", f"/api/campaigns/{open_}/draw"
    cases: list[tuple[str, str | None, dict[str, str], int, str]] = [
        (grab, None, {}, 401, "unauthenticated"),
        (grab, "not-a-token", {}, 401, "unauthenticated"),
        (grab, None, {"Cookie": f"hb_session={token}; hb_session={token}"}, 400, "bad_request"),
        (grab, token, {"X-Requested-With": "", "Origin": "https://evil.example"}, 403, "csrf"),
        (draw, token, {}, 409, "wrong_kind"),
        (draw, token, {"Idempotency-Key": "not ok!"}, 422, "invalid"),
        ("/api/campaigns/nosuchcampaign/grab", token, {}, 404, "not_found"),
        ("/api/campaigns/nosuchcampaign/draw", token, {}, 404, "not_found"),
        (f"/api/campaigns/{'x' * 500}/grab", token, {}, 404, "not_found"),  # not remembered
    ]
    for path, who, headers, status, code in cases:
        answer = await doors.same("POST", path, who, hot_route=True, headers=headers)
        assert (answer.status, answer.body["error"]) == (status, code), path
    pairs = list(_pairs(doors))
    assert len(pairs) == 12 + 1 + len(cases)
    for first, second in pairs:
        assert _without(first, "ts", "duration_ms") == _without(second, "ts", "duration_ms")
        assert first["route"] in (GRAB, DRAW)


async def test_what_the_router_matches_otherwise_goes_to_the_application(doors: Doors) -> None:
    cid = await _create(doors, starts_at="2001-01-01T00:00:00Z", ends_at="2001-01-02T00:00:00Z")
    (token,) = await _players(doors, 1)
    grab = f"/api/campaigns/{cid}/grab"
    cases: list[tuple[str, str | URL, dict[str, Any], int]] = [
        ("GET", grab, {}, 405),  # another method
        ("PUT", f"/api/campaigns/{cid}/draw", {}, 405),
        ("POST", "/api/campaigns//grab", {}, 404),  # no id
        ("POST", f"{grab}/", {}, 404),  # something after the action
        ("POST", f"/api/campaigns/{cid}/grabs", {}, 404),
        # The router unquotes %2F and %25 in an id.
        ("POST", URL(f"/api/campaigns/{cid}%2Fx/grab", encoded=True), {}, 404),
        ("POST", URL(f"/api/campaigns/{cid}%25/grab", encoded=True), {}, 404),
        ("POST", f"/api/campaigns/{cid}/claim", {}, 503),  # a player route, not a hot one
        ("GET", f"/api/campaigns/{cid}", {}, 200),
        ("POST", grab, {"expect100": True, "data": b"{}"}, 409),  # the expect handler's
    ]
    doors.lines()
    for method, path, kwargs, status in cases:
        answer = await doors.same(method, path, token, hot_route=False, **kwargs)
        assert answer.status == status, (method, path, answer.body)
    for first, second in _pairs(doors):
        assert _without(first, "ts", "duration_ms") == _without(second, "ts", "duration_ms")


async def test_draws_are_the_applications(doors: Doors) -> None:
    body = {
        "kind": "lottery",
        "name": "抽奖",
        "starts_at": "2020-02-09T00:00:00+08:00",
        "ends_at": "2999-02-20T00:00:00+08:00",
        "tiers": [{"name": "福袋", "stock": 100, "weight": 10, "value_fen": None}],
        "no_prize_weight": 10,
        "quota_total": 3,
        "quota_daily": None,
    }
    resp = await doors.hot.post("/api/admin/campaigns", json=body, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    cid = (await resp.json())["id"]
    (token,) = await _players(doors, 1)
    path = f"/api/campaigns/{cid}/draw"
    doors.lines()
    # A retry under the same Idempotency-Key answers the same draw, whichever door.
    for n in range(3):
        key = {"Idempotency-Key": f"k{n}"}
        answer = await doors.same("POST", path, token, hot_route=True, headers=key)
        assert answer.body["result"] in ("prize", "no_prize")
    answer = await doors.same("POST", path, token, hot_route=True)
    assert (answer.status, answer.body["error"]) == (429, "quota_exhausted")
    grab = await doors.same("POST", f"/api/campaigns/{cid}/grab", token, hot_route=True)
    assert (grab.status, grab.body["error"]) == (409, "wrong_kind")
    for first, second in _pairs(doors):
        assert _without(first, "ts", "duration_ms") == _without(second, "ts", "duration_ms")
        assert first["user"] is not None


def test_hot_routes_refuse_an_app_they_do_not_know(settings: Settings) -> None:
    app = create_app(settings)

    async def fallback(request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError

    HotRoutes(app, fallback)  # the app as built: accepted
    other = web.Application()
    other.router.add_post("/api/campaigns/{id}/grab", fallback, name="grab")
    with pytest.raises(RuntimeError, match="one middleware"):
        HotRoutes(other, fallback)
