"""Nicknames for the results: a snsapi_userinfo login asks WeChat's /sns/userinfo (the fake
WeChat's here), keeps the nickname in PostgreSQL, and the results show it; a snsapi_base
login, a snapshot user or a WeChat that will not say leave the openid masked."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from app.identity.wechat import clean_nickname
from app.local.fakewechat import FakeWeChat
from app.store.results import public_name
from tests.conftest import create_campaign
from tests.test_ledger import FAST
from tests.test_openapi import Contract
from tests.test_results import final_results
from tests.test_wechat_login import APPID, SECRET, WeChatWorld, login_through_wechat, world

__all__ = ["world"]  # the fixture, imported for this module's tests


async def _logged_in(world: WeChatWorld, client: TestClient, openid: str, **fake: str) -> None:
    resp, _ = await login_through_wechat(world, client, fake_openid=openid, **fake)
    assert resp.status == 302, await resp.text()
    assert "hb_session" in resp.cookies


async def test_userinfo_login_keeps_the_nickname_results_show_it(
    world: WeChatWorld, pg: asyncpg.Connection
) -> None:
    client = await world.browser(wechat_scope="snsapi_userinfo", ledger=FAST)
    await _logged_in(world, client, "oNick0001", fake_nickname="  发财\x00哥  ")
    assert (
        await pg.fetchval("SELECT nickname FROM player_names WHERE openid = 'oNick0001'")
        == "发财哥"
    )
    # A later login with another nickname keeps the latest.
    await _logged_in(world, client, "oNick0001", fake_nickname="恭喜发财")
    rows = await pg.fetch("SELECT openid, nickname FROM player_names")
    assert [tuple(r) for r in rows] == [("oNick0001", "恭喜发财")]
    # The fake's userinfo was asked with the token of the exchange, for that openid.
    assert world.fake.exchanges == 2

    cid = str((await create_campaign(client, total_fen=300, count=1))["id"])
    resp = await client.post(f"/api/campaigns/{cid}/grab")
    assert (await resp.json())["result"] == "won"
    contract = Contract(await (await client.get("/api/openapi.json")).json())
    body, _ = await final_results(client, contract, cid)
    assert body["best"]["name"] == "恭喜发财"
    assert [w["name"] for w in body["winners"]] == ["恭喜发财"]


@pytest.mark.parametrize(
    ("scope", "fake", "named"),
    [
        ("snsapi_base", {}, False),
        ("snsapi_userinfo", {"fake_snapshot": "1"}, False),
        ("snsapi_userinfo", {}, True),
    ],
)
async def test_only_userinfo_logins_are_named(
    world: WeChatWorld, pg: asyncpg.Connection, scope: str, fake: dict[str, str], named: bool
) -> None:
    client = await world.browser(wechat_scope=scope)
    await _logged_in(world, client, "oPlain0002", **fake)
    nickname = await pg.fetchval("SELECT nickname FROM player_names WHERE openid = 'oPlain0002'")
    # Without a nickname typed on its consent page, the fake names the player by openid.
    assert nickname == ("玩家0002" if named else None)


async def test_userinfo_refused_or_down_never_fails_the_login(
    world: WeChatWorld, pg: asyncpg.Connection
) -> None:
    client = await world.browser(wechat_scope="snsapi_userinfo")
    # The fake forgets the access tokens it issued: userinfo answers 40001.
    original = FakeWeChat.exchange

    def forgetful(self: FakeWeChat, *args: Any) -> dict[str, object]:
        answer = original(self, *args)
        self.tokens.clear()
        return answer

    world.fake.exchange = forgetful.__get__(world.fake)  # type: ignore[method-assign]
    await _logged_in(world, client, "oRefused03")
    assert await pg.fetchval("SELECT count(*) FROM player_names") == 0
    # PostgreSQL refusing the write (the table is gone) costs the name, not the login.
    world.fake.exchange = original.__get__(world.fake)  # type: ignore[method-assign]
    await pg.execute("DROP TABLE player_names")
    await _logged_in(world, client, "oNoTable04")


def test_fake_userinfo_errors() -> None:
    fake = FakeWeChat(APPID, SECRET)
    code = fake.issue("oUser", "snsapi_userinfo", None, False, "小红")
    token = str(fake.exchange(APPID, SECRET, code, "authorization_code")["access_token"])
    assert fake.userinfo(token, "oUser")["nickname"] == "小红"
    assert fake.userinfo("nope", "oUser")["errcode"] == 40001
    assert fake.userinfo(token, "oOther")["errcode"] == 40003
    base = fake.issue("oBase", "snsapi_base", None, False)
    token = str(fake.exchange(APPID, SECRET, base, "authorization_code")["access_token"])
    assert fake.userinfo(token, "oBase")["errcode"] == 48001


def test_clean_nickname() -> None:
    assert clean_nickname(" 小明\n ") == "小明"
    assert clean_nickname("\x00\x1f") is None
    assert clean_nickname(None) is None
    assert clean_nickname("长" * 40) == "长" * 32
    assert public_name("oUser", clean_nickname("🧧红包王")) == "🧧红包王"


async def test_fake_wechat_consent_page_asks_a_nickname_for_userinfo(
    world: WeChatWorld,
) -> None:
    url = URL(world.settings.wechat_authorize_url).with_query(
        appid=APPID,
        redirect_uri="http://127.0.0.1/cb",
        response_type="code",
        scope="snsapi_userinfo",
        state="s",
    )
    async with world.first.session.get(url) as resp:
        page = await resp.text()
    assert 'name="fake_nickname"' in page
    async with world.first.session.get(url.update_query(scope="snsapi_base")) as resp:
        assert 'name="fake_nickname"' not in await resp.text()
