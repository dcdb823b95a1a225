"""The service's own records, read over HTTP (operator API, players' /me) or by its CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson
import requests


@dataclass(frozen=True)
class Service:
    """The service at ``host``, with the operator ``token``."""

    host: str
    token: str

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """An operator API call; its JSON answer."""
        resp = requests.request(
            method,
            f"{self.host}{path}",
            data=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
        )
        resp.raise_for_status()
        return resp.json()

    def create_red_packet(self, total_fen: int, count: int) -> str:
        """A new red packet; its id."""
        body = {"kind": "red_packet", "name": "locust 压测", "total_fen": total_fen, "count": count}
        return str(self.admin("POST", "/api/admin/campaigns", body)["id"])

    def drained_stats(self, campaign: str) -> Any:
        """A campaign's operator stats once its ledger lag is zero (or after 60 s)."""
        stats = self.admin("GET", f"/api/admin/campaigns/{campaign}")
        deadline = time.monotonic() + 60
        while stats.get("ledger_lag", 0) and time.monotonic() < deadline:
            time.sleep(0.5)
            stats = self.admin("GET", f"/api/admin/campaigns/{campaign}")
        return stats

    def me(self, campaign: str, token: str) -> Any:
        """What the player of session ``token`` sees of ``campaign``."""
        resp = requests.get(
            f"{self.host}/api/campaigns/{campaign}/me",
            headers={"Cookie": f"hb_session={token}"},
            timeout=30,
        )
        return resp.json()


def reconcile(campaign: str) -> list[str]:
    """``python -m app reconcile``: Redis against the PostgreSQL ledger; problems found."""
    rc = subprocess.run([sys.executable, "-m", "app", "reconcile", campaign], check=False)
    return [] if rc.returncode == 0 else [f"reconcile {campaign} exited {rc.returncode}"]
