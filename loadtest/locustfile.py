"""Players grabbing red packets (and drawing lottery prizes), with an invariant check.

Headless run against a local service (see README "Load tests"):

    HB_ADMIN_TOKEN=$(cat .data/admin-token) \\
    .venv/bin/locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 \\
        -u 200 -r 50 -t 60s

Environment:
    HB_ADMIN_TOKEN   operator token (required: creates the campaign, reads stats)
    HB_CAMPAIGN      red-packet id to grab; unset, one is created (HB_TOTAL_FEN, HB_COUNT)
    HB_LOTTERY       lottery id to draw in too (optional)
    HB_SESSIONS      file from `./hb mint-sessions` (openid<TAB>cookie): players use these
                     sessions instead of spending load on logins; unset, each player logs
                     in through /auth/dev-login (needs DEV_LOGIN=1)
    HB_RECONCILE     "1": at the end also run `python -m app reconcile <campaign>` (needs
                     REDIS_URL and DATABASE_URL of the service in this environment)

When the run stops, the checker compares what players were told with the
operator's view: nobody won twice, every already_won repeats the player's own
amount, the won amounts add up to won_fen, won_fen + remaining_fen == total_fen,
and (with HB_RECONCILE=1) PostgreSQL matches Redis once the ledger lag is zero.
Any mismatch sets the exit code to 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import requests
from locust import FastHttpUser, between, events, task
from locust.env import Environment

ADMIN_TOKEN = os.environ.get("HB_ADMIN_TOKEN", "")
SESSIONS_FILE = os.environ.get("HB_SESSIONS")


class Book:
    """What players were told, for the end-of-run check (one locust process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.won: dict[str, int] = {}
        self.problems: list[str] = []
        self.campaign = os.environ.get("HB_CAMPAIGN", "")
        self.lottery = os.environ.get("HB_LOTTERY", "")
        self.sessions: Iterator[tuple[str, str]] | None = None

    def record(self, openid: str, body: dict[str, Any]) -> None:
        result = body.get("result")
        with self.lock:
            if result == "won":
                if openid in self.won:
                    self.problems.append(f"{openid} won twice")
                self.won[openid] = int(body["amount_fen"])
            elif result == "already_won":
                known = self.won.get(openid)
                if known is not None and known != body["amount_fen"]:
                    self.problems.append(
                        f"{openid} won {known} but already_won says {body['amount_fen']}"
                    )

    def next_session(self) -> tuple[str, str] | None:
        with self.lock:
            if self.sessions is None:
                return None
            return next(self.sessions, None)


BOOK = Book()


def _admin(host: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    resp = requests.request(
        method,
        f"{host}{path}",
        data=None if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=120,
    )
    resp.raise_for_status()
    return resp.json()


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    if not ADMIN_TOKEN:
        sys.exit("HB_ADMIN_TOKEN is required")
    host = environment.host
    if not BOOK.campaign:
        BOOK.campaign = _admin(
            host,
            "POST",
            "/api/admin/campaigns",
            {
                "kind": "red_packet",
                "name": "locust 压测",
                "total_fen": int(os.environ.get("HB_TOTAL_FEN", "10000000")),
                "count": int(os.environ.get("HB_COUNT", "10000")),
            },
        )["id"]
    if SESSIONS_FILE:
        with open(SESSIONS_FILE, encoding="utf-8") as fh:
            pairs = [tuple(line.rstrip("\n").split("\t", 1)) for line in fh if "\t" in line]
        BOOK.sessions = iter(pairs)  # type: ignore[arg-type]


@events.quitting.add_listener
def _check(environment: Environment, **_: Any) -> None:
    host = environment.host
    stats = _admin(host, "GET", f"/api/admin/campaigns/{BOOK.campaign}")
    deadline = time.monotonic() + 60
    while stats.get("ledger_lag", 0) and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = _admin(host, "GET", f"/api/admin/campaigns/{BOOK.campaign}")
    problems = list(BOOK.problems)
    told = sum(BOOK.won.values())
    # Players whose response was lost (timeouts) may have won without our knowing,
    # so the operator's totals may exceed what we heard, never the reverse.
    if stats["won_count"] < len(BOOK.won) or stats["won_fen"] < told:
        problems.append(
            f"players were told {len(BOOK.won)} wins / {told} fen, "
            f"service says {stats['won_count']} / {stats['won_fen']}"
        )
    failures = environment.stats.total.num_failures
    if failures == 0 and (stats["won_count"], stats["won_fen"]) != (len(BOOK.won), told):
        problems.append(
            f"no request failed, yet service says {stats['won_count']} wins / "
            f"{stats['won_fen']} fen and players heard {len(BOOK.won)} / {told}"
        )
    if stats["won_fen"] + stats["remaining_fen"] != stats["total_fen"]:
        problems.append(f"won_fen + remaining_fen != total_fen: {stats}")
    if os.environ.get("HB_RECONCILE") == "1":
        rc = subprocess.run(
            [sys.executable, "-m", "app", "reconcile", BOOK.campaign], check=False
        ).returncode
        if rc != 0:
            problems.append(f"reconcile exited {rc}")
    print(
        f"invariants: {len(BOOK.won)} wins / {told} fen heard by players; service "
        f"won_count={stats['won_count']} won_fen={stats['won_fen']} "
        f"remaining_fen={stats['remaining_fen']} total_fen={stats['total_fen']}"
    )
    for problem in problems:
        print(f"INVARIANT VIOLATED: {problem}")
    if problems:
        environment.process_exit_code = 1
    else:
        print("invariants: OK")


class Player(FastHttpUser):
    """A player: opens the page, grabs once, checks the result, maybe draws."""

    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        self.headers = {"Origin": self.host, "X-Requested-With": "hongbao"}
        pair = BOOK.next_session()
        if pair is None:
            self.openid = f"locust-{uuid.uuid4().hex[:16]}"
            self.client.post("/auth/dev-login", json={"openid": self.openid}, headers=self.headers)
        else:
            self.openid, token = pair
            self.headers["Cookie"] = f"hb_session={token}"
        self.grabbed = False

    @task(2)
    def view(self) -> None:
        self.client.get(f"/api/campaigns/{BOOK.campaign}", name="/api/campaigns/[id]")

    @task(3)
    def grab(self) -> None:
        with self.client.post(
            f"/api/campaigns/{BOOK.campaign}/grab",
            headers=self.headers,
            name="/api/campaigns/[id]/grab",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"grab answered {resp.status_code}: {resp.text}")
                return
            BOOK.record(self.openid, orjson.loads(resp.content))
            self.grabbed = True

    @task(1)
    def me(self) -> None:
        with self.client.get(
            f"/api/campaigns/{BOOK.campaign}/me",
            headers=self.headers,
            name="/api/campaigns/[id]/me",
            catch_response=True,
        ) as resp:
            body = orjson.loads(resp.content)
            known = BOOK.won.get(self.openid)
            if known is not None and body != {"result": "won", "amount_fen": known}:
                resp.failure(f"/me says {body}, the grab said {known}")

    @task(2)
    def draw(self) -> None:
        if not BOOK.lottery:
            return
        with self.client.post(
            f"/api/campaigns/{BOOK.lottery}/draw",
            headers=self.headers,
            name="/api/campaigns/[id]/draw",
            catch_response=True,
        ) as resp:
            if resp.status_code == 429:
                resp.success()  # quota_exhausted is a correct answer
