"""The pages (the H5 page players open, the operators' console) and their static
assets, held in memory under content-hashed names.

Assets are served as ``/static/h5.<hash>.css`` with a year-long immutable cache; each
page's HTML names its own and is itself ``no-cache``, so a deploy reaches players on
their next page load while the assets stay cached until they change. ``/favicon.ico`` keeps the
name browsers ask for, so it is cached for a day instead.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".html": "text/html",
    ".ico": "image/x-icon",
}
# Each page and the assets it names as ``{{name}}``.
_H5 = ("h5.html", ("h5.css", "h5.js"))
_ADMIN = ("admin.html", ("admin.css", "admin.js"))
_FAVICON = "favicon.ico"


@dataclass(frozen=True, slots=True)
class Asset:
    """One file, plain and gzipped."""

    body: bytes
    gzipped: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, content_type: str) -> Asset:
        """An asset for ``body``; the ETag is its content hash."""
        digest = hashlib.sha256(body).hexdigest()
        return cls(body, gzip.compress(body, 9, mtime=0), content_type, f'"{digest[:20]}"')


@dataclass(frozen=True, slots=True)
class Assets:
    """The H5 page, the console, the assets they name (by public file name), the favicon."""

    page: Asset
    admin: Asset
    files: dict[str, Asset]
    favicon: Asset

    @classmethod
    def load(cls, directory: Path = STATIC_DIR) -> Assets:
        """Read the static folder (start-up only) and name each asset by its hash."""
        files: dict[str, Asset] = {}
        page = _page(directory, *_H5, files)
        admin = _page(directory, *_ADMIN, files)
        favicon = Asset.of((directory / _FAVICON).read_bytes(), _TYPES[".ico"])
        return cls(page, admin, files, favicon)


def _page(directory: Path, page: str, assets: tuple[str, ...], files: dict[str, Asset]) -> Asset:
    """The HTML of ``page`` naming its ``assets`` by hash; adds them to ``files``."""
    html = (directory / page).read_text(encoding="utf-8")
    for name in assets:
        path = directory / name
        body = path.read_bytes()
        public = f"{path.stem}.{hashlib.sha256(body).hexdigest()[:12]}{path.suffix}"
        files[public] = Asset.of(body, _TYPES[path.suffix])
        html = html.replace("{{" + name + "}}", f"/static/{public}")
    return Asset.of(html.encode(), _TYPES[".html"])
