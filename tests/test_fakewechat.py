"""The fake WeChat speaks WeChat's wire format; settings for WeChat fail loudly."""

from __future__ import annotations

import re

import orjson
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from app.local.fakewechat import FakeWeChat, create_fake_app
from app.settings import Settings, SettingsError

APPID, SECRET = "wxfake000", "fake-secret-000"
CALLBACK = "http://127.0.0.1:9/auth/wechat/callback"


@pytest.fixture
async def wechat(aiohttp_client) -> TestClient:  # type: ignore[no-untyped-def]
    return await aiohttp_client(create_fake_app(FakeWeChat(APPID, SECRET)))


def authorize_query(**extra: str) -> dict[str, str]:
    return {
        "appid": APPID,
        "redirect_uri": CALLBACK,
        "response_type": "code",
        "scope": "snsapi_userinfo",
        "state": "abc123",
        **extra,
    }


async def token(wechat: TestClient, **params: str) -> dict[str, object]:
    query = {"appid": APPID, "secret": SECRET, "grant_type": "authorization_code", **params}
    resp = await wechat.get("/sns/oauth2/access_token", params=query)
    assert resp.status == 200
    return orjson.loads(await resp.read())  # type: ignore[no-any-return]


async def code_for(wechat: TestClient, **extra: str) -> str:
    resp = await wechat.get(
        "/connect/oauth2/authorize", params=authorize_query(**extra), allow_redirects=False
    )
    assert resp.status == 302
    location = URL(resp.headers["Location"])
    assert str(location.with_query(None)) == CALLBACK
    assert location.query["state"] == "abc123"
    return location.query["code"]


async def test_consent_page_has_both_buttons(wechat: TestClient) -> None:
    resp = await wechat.get("/connect/oauth2/authorize", params=authorize_query())
    html = await resp.text()
    assert resp.status == 200
    assert ">同意</button>" in html
    assert ">拒绝</button>" in html
    assert 'name="state" value="abc123"' in html
    allow = await wechat.get(
        "/connect/oauth2/fake-decide",
        params=authorize_query(decision="allow", fake_openid="o-form"),
        allow_redirects=False,
    )
    code = URL(allow.headers["Location"]).query["code"]
    assert (await token(wechat, code=code))["openid"] == "o-form"
    deny = await wechat.get(
        "/connect/oauth2/fake-decide",
        params=authorize_query(decision="deny"),
        allow_redirects=False,
    )
    assert dict(URL(deny.headers["Location"]).query) == {"state": "abc123"}


async def test_exchange_answers_identity_once(wechat: TestClient) -> None:
    code = await code_for(wechat, fake_openid="o1", fake_unionid="u1")
    answer = await token(wechat, code=code)
    assert answer["openid"] == "o1"
    assert answer["unionid"] == "u1"
    assert answer["scope"] == "snsapi_userinfo"
    assert answer["expires_in"] == 7200
    assert {"access_token", "refresh_token"} <= set(answer)
    assert "is_snapshotuser" not in answer
    again = await token(wechat, code=code)
    assert again["errcode"] == 40163
    assert str(again["errmsg"]).startswith("code been used")


async def test_snapshot_and_base_scope(wechat: TestClient) -> None:
    code = await code_for(wechat, fake_openid="o2", fake_snapshot="1", scope="snsapi_base")
    answer = await token(wechat, code=code)
    assert answer["is_snapshotuser"] == 1
    assert "unionid" not in answer


@pytest.mark.parametrize(
    ("params", "errcode"),
    [
        ({"appid": "wxother"}, 40013),
        ({"secret": "nope"}, 40125),
        ({"grant_type": "client_credential"}, 40002),
        ({"code": ""}, 41008),
        ({"code": "not-a-code"}, 40029),
    ],
)
async def test_exchange_errors(wechat: TestClient, params: dict[str, str], errcode: int) -> None:
    code = await code_for(wechat, fake_openid="o3")
    answer = await token(wechat, **({"code": code} | params))
    assert answer["errcode"] == errcode
    assert re.fullmatch(r"[a-z _]+, rid: [0-9a-f]{8}", str(answer["errmsg"]))


async def test_code_expires_after_five_minutes() -> None:
    now = [0.0]
    fake = FakeWeChat(APPID, SECRET, clock=lambda: now[0])
    fresh = fake.issue("o", "snsapi_base", None, False)
    stale = fake.issue("o", "snsapi_base", None, False)
    now[0] = 299.0
    assert fake.exchange(APPID, SECRET, fresh, "authorization_code")["openid"] == "o"
    now[0] = 300.0
    assert fake.exchange(APPID, SECRET, stale, "authorization_code")["errcode"] == 40029


@pytest.mark.parametrize(
    "query",
    [
        {"appid": "wxother"},
        {"response_type": "token"},
        {"scope": "snsapi_login"},
        {"redirect_uri": "/relative"},
    ],
)
async def test_authorize_rejects_bad_parameters(wechat: TestClient, query: dict[str, str]) -> None:
    resp = await wechat.get(
        "/connect/oauth2/authorize", params=authorize_query(**query), allow_redirects=False
    )
    assert resp.status == 400


BASE_ENV = {
    "REDIS_URL": "redis://x",
    "DATABASE_URL": "postgresql://x",
    "ADMIN_TOKEN": "a" * 16,
}


def test_wechat_settings_from_env() -> None:
    settings = Settings.from_env(
        BASE_ENV
        | {
            "WECHAT_APPID": "wx1",
            "WECHAT_SECRET": "topsecret-value",
            "WECHAT_SCOPE": "snsapi_userinfo",
            "WECHAT_API_BASE": "http://127.0.0.1:1/",
            "PUBLIC_BASE_URL": "https://hb.example.com/",
        }
    )
    assert settings.wechat_scope == "snsapi_userinfo"
    assert settings.wechat_api_base == "http://127.0.0.1:1"
    assert settings.wechat_authorize_url == "https://open.weixin.qq.com/connect/oauth2/authorize"
    assert settings.public_base_url == "https://hb.example.com"
    assert "topsecret-value" not in repr(settings)


@pytest.mark.parametrize(
    "bad",
    [
        {"WECHAT_SCOPE": "snsapi_login"},
        {"WECHAT_APPID": "wx1"},
        {"WECHAT_SECRET": "s"},
        {"PUBLIC_BASE_URL": "https://hb.example.com/path"},
        {"PUBLIC_BASE_URL": "hb.example.com"},
        {"WECHAT_API_BASE": "ftp://x"},
    ],
)
def test_bad_wechat_settings_refused(bad: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(BASE_ENV | bad)
