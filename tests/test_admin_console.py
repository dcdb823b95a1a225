"""The operators' console at /admin: served like the H5 page (no-cache HTML, hashed assets,
strict CSP, nothing inline), bilingual labels, and a box for every field of the
definitions the create call validates, so each 422's ``field`` has a place to show."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import msgspec
from aiohttp.test_utils import TestClient

from app.lottery.spec import LotteryDefinition, TierDefinition
from app.redpacket.spec import RedPacketDefinition
from app.web.assets import STATIC_DIR
from app.web.handlers.page import PAGE_CSP

CJK = re.compile(r"[\u4e00-\u9fff]")
# A slot schedule is written as JSON by hand or with the CLI; its errors show on its tier.
NOT_IN_FORM = {"schedule"}


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside each field label."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.labels: list[list[str]] = []
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.tags.append((tag, found))
        if "field__label" in found.get("class", "").split():
            self.labels.append([])
            self._open.append(tag)
        elif self._open:
            self._open.append(tag)
            if "en" in found.get("class", "").split():
                self.labels[-1].append("<en>")

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open:
            self.labels[-1].append(data)


async def _console(client: TestClient) -> tuple[str, Elements]:
    resp = await client.get("/admin")
    assert resp.status == 200
    html = await resp.text()
    parsed = Elements()
    parsed.feed(html)
    return html, parsed


async def test_console_is_html_never_cached_under_a_strict_csp(client: TestClient) -> None:
    resp = await client.get("/admin")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.charset == "utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["Content-Security-Policy"] == PAGE_CSP
    assert "script-src 'self';" in PAGE_CSP
    assert "unsafe-inline" not in PAGE_CSP
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    again = await client.get("/admin", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304


async def test_nothing_inline_and_assets_hashed(client: TestClient) -> None:
    html, parsed = await _console(client)
    assert '<html lang="zh-CN">' in html
    assert 'name="viewport"' in html
    assert "{{" not in html
    assert "<style" not in html
    for tag, attrs in parsed.tags:
        assert "style" not in attrs, (tag, attrs)
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "script":
            assert attrs.get("src", "").startswith("/static/"), attrs
    paths = re.findall(r'(?:href|src)="(/static/[^"]+)"', html)
    assert len(paths) == 2
    total = 0
    for path in paths:
        match = re.fullmatch(r"/static/admin\.([0-9a-f]{12})\.(css|js)", path)
        assert match, path
        resp = await client.get(path, headers={"Accept-Encoding": "identity"})
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert resp.content_type == ("text/css" if match[2] == "css" else "text/javascript")
        body = await resp.read()
        assert body == (STATIC_DIR / f"admin.{match[2]}").read_bytes()
        total += len(body)
    # Hand-written, no framework, no chart library.
    assert total < 60_000
    # The H5 page still names only its own two assets.
    h5 = await (await client.get("/c/abc")).text()
    assert len(re.findall(r'src="/static/h5\.[0-9a-f]{12}\.js"', h5)) == 1
    assert "admin." not in h5


async def test_every_label_is_chinese_and_english(client: TestClient) -> None:
    _, parsed = await _console(client)
    assert len(parsed.labels) > 20
    for parts in parsed.labels:
        text = "".join(parts)
        chinese, _, english = text.partition("<en>")
        assert CJK.search(chinese), text
        assert re.search(r"[A-Za-z]", english), text


def _fields(struct: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct)} - NOT_IN_FORM


async def test_every_definition_field_has_its_box(client: TestClient) -> None:
    html, parsed = await _console(client)
    boxes = {attrs["data-field"] for _, attrs in parsed.tags if attrs.get("data-field")}
    ids = {attrs["id"] for _, attrs in parsed.tags if "id" in attrs}
    keys = {attrs["data-key"] for _, attrs in parsed.tags if "data-key" in attrs}
    for struct in (RedPacketDefinition, LotteryDefinition):
        for name in _fields(struct) - {"tiers"}:
            assert name in boxes, f"{struct.__name__}.{name} has no box in the console"
            assert f"f-{name}" in ids, f"{struct.__name__}.{name} has no input"
    assert "kind" in boxes
    assert "tiers" in boxes
    # A tier's boxes are numbered by the page (tiers[0].stock); the template holds each.
    template = html.split('<template id="tier-template">', 1)[1].split("</template>", 1)[0]
    for name in _fields(TierDefinition):
        assert name in keys, f"TierDefinition.{name} has no box in the tier template"
        assert f'data-field="{name}"' in template
