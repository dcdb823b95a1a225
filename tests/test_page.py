"""The H5 page and its assets: cache headers, hashed names, small size."""

from __future__ import annotations

import gzip
import re

from aiohttp.test_utils import TestClient

from app.web.assets import STATIC_DIR


async def asset_paths(client: TestClient) -> list[str]:
    html = await (await client.get("/c/abc")).text()
    return re.findall(r'(?:href|src)="(/static/[^"]+)"', html)


async def test_page_is_html_and_never_cached(client: TestClient) -> None:
    for path in ("/", "/c/0123456789abcdef"):
        resp = await client.get(path)
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        html = await resp.text()
        assert '<html lang="zh-CN">' in html
        assert 'name="viewport"' in html
        assert "{{" not in html


async def test_assets_have_hashed_names_and_long_cache(client: TestClient) -> None:
    paths = await asset_paths(client)
    assert len(paths) == 2
    types = set()
    total = 0
    for path in paths:
        assert re.fullmatch(r"/static/h5\.[0-9a-f]{12}\.(css|js)", path), path
        resp = await client.get(path, headers={"Accept-Encoding": "identity"})
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        types.add(resp.content_type)
        body = await resp.read()
        total += len(body)
        name = path.rsplit("/", 1)[1]
        source = (STATIC_DIR / (name.split(".")[0] + "." + name.split(".")[-1])).read_bytes()
        assert body == source
        again = await client.get(path, headers={"If-None-Match": resp.headers["ETag"]})
        assert again.status == 304
    assert types == {"text/css", "text/javascript"}
    # No framework: the whole page stays small.
    assert total < 40_000


async def test_assets_gzipped_when_accepted(client: TestClient) -> None:
    path = (await asset_paths(client))[1]
    resp = await client.get(path, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    plain = await client.get(path, headers={"Accept-Encoding": "identity"})
    assert gzip.decompress(await resp.read()) == await plain.read()


async def test_unknown_asset_is_json_404(client: TestClient) -> None:
    resp = await client.get("/static/h5.000000000000.js")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
