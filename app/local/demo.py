"""Pieces of the one-command local run: the fake WeChat and a demo campaign to open."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from app.local.embedded import _wait_port, free_port

DEMO_CAMPAIGN = {
    "kind": "red_packet",
    "name": "新春红包（本地演示）",
    "total_fen": 100_000,
    "count": 100,
}


def start_fake_wechat(env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Start the fake WeChat and point ``env`` at it, unless a real WeChat is configured."""
    if env.get("WECHAT_APPID"):
        return None
    port = free_port()
    env["WECHAT_APPID"] = f"wxfake{secrets.token_hex(5)}"
    env["WECHAT_SECRET"] = secrets.token_hex(16)
    env["WECHAT_AUTHORIZE_URL"] = f"http://127.0.0.1:{port}/connect/oauth2/authorize"
    env["WECHAT_API_BASE"] = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "fake-wechat", "--port", str(port)], env=env
    )
    _wait_port(port, proc, "fake WeChat")
    return proc


def _call(method: str, url: str, token: str, body: dict[str, object] | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def wait_ready(urls: list[str], procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """Return once every URL (a worker's /readyz) answers 200; raise if a process exits."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        if any(proc.poll() is not None for proc in procs):
            raise RuntimeError("a worker exited during start-up (its error is above)")
        try:
            urllib.request.urlopen(pending[0], timeout=2).close()
            pending.pop(0)
            continue
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers were not ready within {timeout:.0f}s") from None
        time.sleep(0.2)


def demo_page(base_url: str, admin_token: str, data_dir: Path, shards: int = 1) -> str:
    """The H5 page URL of the demo campaign, created on the first run (workers ready);
    ``shards`` > 1 (a local cluster): dealt into that many sub-pools, one per master."""
    saved = data_dir / "demo-campaign"
    if saved.exists():
        cid = saved.read_text().strip()
        try:
            _call("GET", f"{base_url}/api/campaigns/{cid}", admin_token)
            return f"{base_url}/c/{cid}"
        except urllib.error.HTTPError:
            pass
    definition = {**DEMO_CAMPAIGN, **({"shards": shards} if shards > 1 else {})}
    created = _call("POST", f"{base_url}/api/admin/campaigns", admin_token, definition)
    cid = str(created["id"]) if isinstance(created, dict) else ""
    saved.write_text(cid + "\n")
    return f"{base_url}/c/{cid}"
