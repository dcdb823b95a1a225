"""WeChat web authorization against the fake WeChat, every error path included."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import orjson
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from yarl import URL

from app.identity.login import safe_next
from app.identity.sessions import sid_of
from app.local.embedded import free_port
from app.local.fakewechat import FakeWeChat, create_fake_app
from app.settings import Settings
from app.store.scripts import CampaignKeys, login_key, session_key
from app.web.factory import create_app
from tests.conftest import PAGE, create_campaign

APPID = "wxtest0123456789"
SECRET = "s3cr3t-never-shown-0f1e2d3c4b5a"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class WeChatWorld:
    """The fake WeChat and our app; ``first`` is a browser on the app, ``browser`` adds more."""

    fake: FakeWeChat
    clock: Clock
    settings: Settings
    first: TestClient
    browser: Callable[..., Awaitable[TestClient]]

    async def authorize(self, authorize_url: str, **fake: str) -> str:
        """What the player's WeChat does: open the authorize URL, return the callback URL."""
        url = URL(authorize_url.split("#", 1)[0]).extend_query(fake)
        async with (
            ClientSession() as wechat_side,
            wechat_side.get(url, allow_redirects=False) as resp,
        ):
            assert resp.status == 302, await resp.text()
            return resp.headers["Location"]


@pytest.fixture
async def world(aiohttp_server, aiohttp_client, settings: Settings) -> AsyncIterator[WeChatWorld]:  # type: ignore[no-untyped-def]
    clock = Clock()
    fake = FakeWeChat(APPID, SECRET, clock=clock)
    server = await aiohttp_server(create_fake_app(fake), access_log=None)
    wechat_settings = settings.with_(
        wechat_appid=APPID,
        wechat_secret=SECRET,
        wechat_authorize_url=str(server.make_url("/connect/oauth2/authorize")),
        wechat_api_base=str(server.make_url("")).rstrip("/"),
    )
    first = await aiohttp_client(create_app(wechat_settings), headers=PAGE)
    extras: list[TestClient] = []

    async def browser(**changes: object) -> TestClient:
        """Another browser (own cookie jar): on the same app, or on one with other settings."""
        if changes:
            return await aiohttp_client(create_app(wechat_settings.with_(**changes)), headers=PAGE)
        extra = TestClient(first.server, headers=PAGE)
        extras.append(extra)
        return extra

    yield WeChatWorld(fake, clock, wechat_settings, first, browser)
    for extra in extras:
        # Closing the client would stop the shared server; close only its session.
        await extra.session.close()


async def start_login(client: TestClient, next_path: str = "/c/abc") -> str:
    resp = await client.get("/auth/wechat/login", params={"next": next_path}, allow_redirects=False)
    assert resp.status == 302, await resp.text()
    return resp.headers["Location"]


async def follow_callback(client: TestClient, callback_url: str) -> web.Response:
    url = URL(callback_url)
    assert url.path == "/auth/wechat/callback"
    return await client.get(url.path_qs, allow_redirects=False)  # type: ignore[return-value]


def session_cookie(resp) -> str | None:  # type: ignore[no-untyped-def]
    morsel = resp.cookies.get("hb_session")
    return None if morsel is None else morsel.value


async def login_through_wechat(
    world: WeChatWorld, client: TestClient, next_path: str = "/c/abc", **fake: str
):  # type: ignore[no-untyped-def]
    authorize_url = await start_login(client, next_path)
    callback_url = await world.authorize(authorize_url, **({"fake_openid": "alice"} | fake))
    return await follow_callback(client, callback_url), callback_url


async def test_login_redirects_to_wechat_as_documented(world: WeChatWorld, redis: Redis) -> None:
    client = world.first
    resp = await client.get("/auth/wechat/login", params={"next": "/c/abc"}, allow_redirects=False)
    assert resp.status == 302
    location = resp.headers["Location"]
    base = world.settings.wechat_authorize_url
    callback = f"http://{client.host}:{client.port}/auth/wechat/callback"
    match = re.fullmatch(
        re.escape(f"{base}?appid={APPID}&redirect_uri=")
        + r"(?P<uri>[^&]+)"
        + re.escape("&response_type=code&scope=snsapi_base&state=")
        + r"(?P<state>[0-9a-f]{32})"
        + re.escape("#wechat_redirect"),
        location,
    )
    assert match is not None, location
    # redirect_uri is fully URL-encoded (no raw ':' or '/').
    assert ":" not in match["uri"]
    assert "/" not in match["uri"]
    assert unquote(match["uri"]) == callback
    cookie = resp.headers["Set-Cookie"]
    assert "hb_login=" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Path=/auth/wechat" in cookie
    key = login_key(match["state"])
    record = await redis.hgetall(key)
    assert record[b"next"] == b"/c/abc"
    assert b"t" not in record
    assert b"c" not in record
    assert 0 < await redis.ttl(key) <= 600


async def test_login_creates_session_keyed_by_openid(
    world: WeChatWorld,
    aiohttp_client,
    redis: Redis,  # type: ignore[no-untyped-def]
) -> None:
    client = await world.browser(wechat_scope="snsapi_userinfo")
    campaign = await create_campaign(client, total_fen=1_000, count=10)
    cid = str(campaign["id"])
    resp, _ = await login_through_wechat(world, client, f"/c/{cid}", fake_unionid="U-alice")
    assert resp.status == 302
    assert resp.headers["Location"] == f"/c/{cid}"
    token = session_cookie(resp)
    assert token is not None
    stored = orjson.loads(await redis.get(session_key(sid_of(token))))
    assert stored == {"openid": "alice", "unionid": "U-alice", "snapshot": False}

    grab = await (await client.post(f"/api/campaigns/{cid}/grab")).json()
    assert grab["result"] == "won"
    winners = await redis.hgetall(CampaignKeys.of(cid).winners)
    assert list(winners) == [b"alice"]
    me = await (await client.get(f"/api/campaigns/{cid}/me")).json()
    assert me == {"result": "won", "amount_fen": grab["amount_fen"]}


async def test_callback_twice_same_code_gives_same_session(
    world: WeChatWorld, redis: Redis
) -> None:
    client = world.first
    first, callback_url = await login_through_wechat(world, client)
    second = await follow_callback(client, callback_url)
    assert first.status == second.status == 302
    assert second.headers["Location"] == first.headers["Location"] == "/c/abc"
    assert session_cookie(first) is not None
    assert session_cookie(second) == session_cookie(first)
    assert world.fake.exchanges == 1
    sessions = [k async for k in redis.scan_iter("hb:sess:*")]
    assert len(sessions) == 1


async def test_concurrent_callbacks_same_code_one_exchange(
    aiohttp_server,
    aiohttp_client,
    settings: Settings,
    redis: Redis,  # type: ignore[no-untyped-def]
) -> None:
    """WeChat's retry arrives while the first exchange is still in flight."""
    fake = FakeWeChat(APPID, SECRET)
    fake_app = create_fake_app(fake)

    @web.middleware
    async def slow(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.path.startswith("/sns/"):
            await asyncio.sleep(0.3)
        return await handler(request)

    fake_app.middlewares.append(slow)
    server = await aiohttp_server(fake_app, access_log=None)
    app = create_app(
        settings.with_(
            wechat_appid=APPID,
            wechat_secret=SECRET,
            wechat_authorize_url=str(server.make_url("/connect/oauth2/authorize")),
            wechat_api_base=str(server.make_url("")).rstrip("/"),
        )
    )
    client = await aiohttp_client(app, headers=PAGE)
    authorize_url = await start_login(client)
    async with ClientSession() as wechat_side:
        url = URL(authorize_url.split("#")[0]).extend_query(fake_openid="bob")
        async with wechat_side.get(url, allow_redirects=False) as resp:
            callback_url = resp.headers["Location"]
    responses = await asyncio.gather(*(follow_callback(client, callback_url) for _ in range(3)))
    tokens = {session_cookie(r) for r in responses}
    assert [r.status for r in responses] == [302, 302, 302]
    assert len(tokens) == 1
    assert None not in tokens
    assert fake.exchanges == 1


async def test_invalid_code_40029(world: WeChatWorld, redis: Redis) -> None:
    client = world.first
    authorize_url = await start_login(client)
    callback_url = URL(await world.authorize(authorize_url, fake_openid="carol"))
    forged = callback_url.update_query(code="0" * 32)
    resp = await follow_callback(client, str(forged))
    assert resp.status == 400
    page = await resp.text()
    assert 'data-error="invalid_code"' in page
    assert "40029" in page
    assert session_cookie(resp) is None
    # The login is spent: the real code cannot be redeemed on the same state any more.
    assert await redis.exists(login_key(callback_url.query["state"])) == 0
    again = await follow_callback(client, str(callback_url))
    assert again.status == 400
    assert 'data-error="bad_state"' in await again.text()
    assert [k async for k in redis.scan_iter("hb:sess:*")] == []


async def test_code_expires_after_five_minutes(world: WeChatWorld, redis: Redis) -> None:
    client = world.first
    authorize_url = await start_login(client)
    callback_url = await world.authorize(authorize_url, fake_openid="slow")
    world.clock.now += 301
    resp = await follow_callback(client, callback_url)
    assert resp.status == 400
    assert 'data-error="invalid_code"' in await resp.text()
    assert session_cookie(resp) is None


async def test_code_used_by_another_browser_40163(world: WeChatWorld, redis: Redis) -> None:
    alice = world.first
    resp, callback_url = await login_through_wechat(world, alice)
    alice_token = session_cookie(resp)
    assert alice_token is not None

    # Another browser replays alice's code with a state of its own: WeChat says 40163.
    mallory = await world.browser()
    own_state = URL((await start_login(mallory)).split("#")[0]).query["state"]
    replay = URL(callback_url).update_query(state=own_state)
    stolen = await follow_callback(mallory, str(replay))
    assert stolen.status == 400
    page = await stolen.text()
    assert 'data-error="code_used"' in page
    assert "40163" in page
    assert session_cookie(stolen) is None
    assert world.fake.exchanges == 2
    assert await redis.get(session_key(sid_of(alice_token))) is not None


async def test_refusal_goes_back_to_the_page(world: WeChatWorld, redis: Redis) -> None:
    client = world.first
    authorize_url = await start_login(client, "/c/xyz?from=share")
    callback_url = URL(await world.authorize(authorize_url, fake_deny="1"))
    assert "code" not in callback_url.query
    resp = await follow_callback(client, str(callback_url))
    assert resp.status == 302
    assert resp.headers["Location"] == "/c/xyz?from=share&login=denied"
    assert session_cookie(resp) is None
    assert await redis.exists(login_key(callback_url.query["state"])) == 0
    assert world.fake.exchanges == 0


async def test_refusal_with_unknown_state_goes_home(world: WeChatWorld) -> None:
    client = world.first
    resp = await client.get(
        "/auth/wechat/callback", params={"state": "f" * 32}, allow_redirects=False
    )
    assert resp.status == 302
    assert resp.headers["Location"] == "/?login=denied"


async def test_snapshot_user_may_look_not_grab(world: WeChatWorld, redis: Redis) -> None:
    client = world.first
    campaign = await create_campaign(client, total_fen=500, count=5)
    cid = str(campaign["id"])
    resp, _ = await login_through_wechat(world, client, f"/c/{cid}", fake_snapshot="1")
    token = session_cookie(resp)
    assert token is not None
    assert orjson.loads(await redis.get(session_key(sid_of(token))))["snapshot"] is True
    assert (await client.get(f"/api/campaigns/{cid}")).status == 200
    assert await (await client.get(f"/api/campaigns/{cid}/me")).json() == {"result": "none"}
    grab = await client.post(f"/api/campaigns/{cid}/grab")
    assert grab.status == 403
    body = await grab.json()
    assert body["error"] == "forbidden"
    assert body["reason"] == "snapshot_user"
    assert await redis.llen(CampaignKeys.of(cid).pool) == 5
    assert await redis.hlen(CampaignKeys.of(cid).winners) == 0


@pytest.mark.parametrize("how", ["absent", "unknown", "malformed", "other_browser", "no_cookie"])
async def test_bad_state_refused_without_spending_the_code(
    world: WeChatWorld, redis: Redis, how: str
) -> None:
    alice = world.first
    authorize_url = await start_login(alice)
    callback_url = URL(await world.authorize(authorize_url, fake_openid="alice"))
    if how == "absent":
        target, who = callback_url.without_query_params("state"), alice
    elif how == "unknown":
        target, who = callback_url.update_query(state="a" * 32), alice
    elif how == "malformed":
        target, who = callback_url.update_query(state="../../x"), alice
    elif how == "other_browser":
        # Another browser with a login of its own (so its own pre-login cookie).
        other = await world.browser()
        await start_login(other)
        target, who = callback_url, other
    else:
        alice.session.cookie_jar.clear()
        target, who = callback_url, alice
    resp = await follow_callback(who, str(target))
    assert resp.status == 400
    assert 'data-error="bad_state"' in await resp.text()
    assert session_cookie(resp) is None
    # The code was never sent to WeChat, so the rightful browser can still finish.
    assert world.fake.exchanges == 0
    if how in {"absent", "unknown", "malformed", "other_browser"}:
        ok = await follow_callback(alice, str(callback_url))
        assert ok.status == 302
        assert session_cookie(ok) is not None


@pytest.mark.parametrize(
    "evil",
    [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example/",
        "\\\\evil.example",
        "/\t/evil.example",
        "/\n/evil.example",
        "javascript:alert(1)",
        "http:/evil.example",
        " /c/abc",
        "/c/abc\r\nSet-Cookie: x=1",
        "/c/红包",
    ],
)
async def test_open_redirect_refused(world: WeChatWorld, evil: str) -> None:
    client = world.first
    resp, _ = await login_through_wechat(world, client, evil)
    assert resp.status == 302
    assert resp.headers["Location"] == "/"


def test_safe_next_keeps_paths_on_this_site() -> None:
    assert safe_next("/c/abc") == "/c/abc"
    assert safe_next("/c/abc?x=1&y=%2F%2F") == "/c/abc?x=1&y=%2F%2F"
    assert safe_next("/") == "/"
    assert safe_next(None) == "/"
    assert safe_next("") == "/"
    assert safe_next("/" + "a" * 600) == "/"


@pytest.mark.parametrize(
    ("errcode", "change"),
    [(40013, {"wechat_appid": "wxwrongappid"}), (40125, {"wechat_secret": "wrong-secret"})],
)
async def test_misconfigured_app_gets_clear_page(
    world: WeChatWorld, errcode: int, change: dict[str, str]
) -> None:
    client = await world.browser(**change)
    authorize_url = await start_login(client)
    # The authorize page checks the appid too; mint the code with the right one.
    good = URL(authorize_url.split("#")[0]).update_query(appid=APPID)
    callback_url = await world.authorize(str(good), fake_openid="dave")
    resp = await follow_callback(client, callback_url)
    assert resp.status == 502
    page = await resp.text()
    assert 'data-error="wechat_error"' in page
    assert str(errcode) in page
    assert session_cookie(resp) is None


async def test_wechat_unreachable_gets_clear_page_and_retry_works(
    world: WeChatWorld, redis: Redis
) -> None:
    dead = await world.browser(wechat_api_base=f"http://127.0.0.1:{free_port()}")
    authorize_url = await start_login(dead)
    callback_url = await world.authorize(authorize_url, fake_openid="erin")
    resp = await follow_callback(dead, callback_url)
    assert resp.status == 503
    assert 'data-error="unavailable"' in await resp.text()
    state = URL(callback_url).query["state"]
    # The claim is released: a reload of the callback may try again.
    assert await redis.hget(login_key(state), "c") is None
    assert await redis.hget(login_key(state), "b") is not None


async def test_wechat_answering_garbage_gets_clear_page(
    aiohttp_server,
    aiohttp_client,
    settings: Settings,  # type: ignore[no-untyped-def]
) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>bad gateway</html>")

    junk = web.Application()
    junk.router.add_get("/sns/oauth2/access_token", broken)
    server = await aiohttp_server(junk, access_log=None)
    client = await aiohttp_client(
        create_app(
            settings.with_(
                wechat_appid=APPID,
                wechat_secret=SECRET,
                wechat_api_base=str(server.make_url("")).rstrip("/"),
            )
        ),
        headers=PAGE,
    )
    authorize_url = await start_login(client)
    state = URL(authorize_url.split("#")[0]).query["state"]
    resp = await client.get(
        "/auth/wechat/callback", params={"code": "x" * 32, "state": state}, allow_redirects=False
    )
    assert resp.status == 503
    assert 'data-error="unavailable"' in await resp.text()


async def test_not_configured_is_a_clear_page(client: TestClient) -> None:
    resp = await client.get("/auth/wechat/login", params={"next": "/c/a"}, allow_redirects=False)
    assert resp.status == 503
    assert 'data-error="not_configured"' in await resp.text()


async def test_secret_never_in_responses_or_logs(
    world: WeChatWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    client = world.first

    def keep(resp) -> None:  # type: ignore[no-untyped-def]
        bodies.append(str(resp.headers))
        bodies.append(str(resp.cookies))

    resp, callback_url = await login_through_wechat(world, client)
    keep(resp)
    again = await follow_callback(client, callback_url)
    keep(again)
    bodies.append(await again.text())
    for state_change in ({"code": "bogus"}, {}):
        url = URL(await world.authorize(await start_login(client), fake_openid="f"))
        r = await follow_callback(client, str(url.update_query(state_change)))
        keep(r)
        bodies.append(await r.text())
    dead = await world.browser(wechat_api_base=f"http://127.0.0.1:{free_port()}")
    url = await world.authorize(await start_login(dead), fake_openid="g")
    r = await follow_callback(dead, url)
    keep(r)
    bodies.append(await r.text())
    wrong = await world.browser(wechat_secret="another-secret-xyz")
    url = await world.authorize(await start_login(wrong), fake_openid="h")
    r = await follow_callback(wrong, url)
    keep(r)
    bodies.append(await r.text())

    assert world.fake.exchanges >= 3
    assert all(SECRET not in b for b in bodies)
    logged = [rec.getMessage() + (rec.exc_text or "") for rec in caplog.records]
    assert any("wechat" in line for line in logged)
    assert all(SECRET not in line for line in logged)
    assert SECRET not in repr(world.settings)
