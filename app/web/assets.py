"""The H5 page and its static assets, held in memory under content-hashed names.

Assets are served as ``/static/h5.<hash>.css`` with a year-long immutable cache; the
HTML names them and is itself ``no-cache``, so a deploy reaches players on their next
page load while the assets stay cached until they change. ``/favicon.ico`` keeps the
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
_ASSETS = ("h5.css", "h5.js")
_PAGE = "h5.html"
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
    """The page, the assets it names (by public file name) and the favicon."""

    page: Asset
    files: dict[str, Asset]
    favicon: Asset

    @classmethod
    def load(cls, directory: Path = STATIC_DIR) -> Assets:
        """Read the static folder (start-up only) and name each asset by its hash."""
        files: dict[str, Asset] = {}
        html = (directory / _PAGE).read_text(encoding="utf-8")
        for name in _ASSETS:
            path = directory / name
            body = path.read_bytes()
            stem, ext = path.stem, path.suffix
            public = f"{stem}.{hashlib.sha256(body).hexdigest()[:12]}{ext}"
            files[public] = Asset.of(body, _TYPES[ext])
            html = html.replace("{{" + name + "}}", f"/static/{public}")
        favicon = Asset.of((directory / _FAVICON).read_bytes(), _TYPES[".ico"])
        return cls(Asset.of(html.encode(), _TYPES[".html"]), files, favicon)
